"""The PTB tokenizer step of the COCO caption toolkit, in Python, so that SCST's reward needs no Java.

pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer with `-preserveLines -lowerCase` (the lexer's
default options otherwise: PTB3 escaping, LaTeX quotes, split assimilations, no americanization). That
tokenizer is a JFlex lexer (PTBLexer.flex of v3.4.1); this module lexes as it does: at each position
every rule is tried, the longest match wins (a trailing context counts towards its length) and the
earlier rule wins a tie; a rule's action says what token it makes and how much it consumes. Only the
rules a one-line caption can reach are here (no SGML entities beyond the lexer's own, no newlines).

Known differences. (1) Java lexes all captions of a call as one text and looks ahead across lines, so
a caption's last token can depend on the next caption: an abbreviation that counts only before a number
(ca. fig. no. nos. art. pp. op. bldg. prop.) keeps its period when the next caption starts with a digit,
and a one-letter acronym ("i.e.") loses it before a capitalized "The", "A", "He" and the like; here each
caption is lexed alone, as if an empty line followed it. (2) Rarely, the jar's output also depends on
where a caption falls in its read buffer (a JFlex trailing-context bug: "cat/dognon-U.S." gave "s" once
and "s." alone). (3) A letter or digit is Python's Unicode (14), not the Java tables the jar was built
with, so characters assigned or recategorized since may lex differently; characters outside the Basic
Multilingual Plane are never letters, as in the jar."""

import functools
import re
import unicodedata
from collections.abc import Callable

import regex


def _character_class(categories: tuple[str, ...], extra: str = "") -> str:
    """A regex character class of the Basic Multilingual Plane's characters in these Unicode categories."""
    ranges, start = [], None
    for code in range(0x10000):
        inside = 0xD800 <= code <= 0xDFFF or not unicodedata.category(chr(code)).startswith(categories)
        if not inside and start is None:
            start = code
        elif inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    spans = "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)
    return f"[{spans}{extra}]"


# JFlex's [:letter:] and [:digit:] are Java's Character.isLetter and isDigit; PTBLexer adds some marks.
_LETTER_ONLY = _character_class(("Lu", "Ll", "Lt", "Lm", "Lo"))
_EXTRA_LETTERS = (
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF"
    r"\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1"
    r"\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F"
    r"\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E"
    r"\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3"
    r"\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD"
    r"\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD"
)
_DIGIT_ONLY = _character_class(("Nd",))
_UPPERCASE = _character_class(("Lu",))

# The lexer's macros (%caseless: literal text ignores case, character classes do not; hence the (?i:)).
LETTER = rf"(?:{_character_class(('Lu', 'Ll', 'Lt', 'Lm', 'Lo'), _EXTRA_LETTERS)}|&[aeiouAEIOU](?i:acute|grave|uml);)"
DIGIT = _DIGIT_ONLY
LETTER_OR_DIGIT = rf"(?:{_LETTER_ONLY}|{DIGIT})"
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
NEWLINE = r"(?:\r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
SPACENL = rf"(?:{SPACE}|{NEWLINE})"
SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*|[A-Za-z]"
    r"[A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
)
APOS = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOSETCETERA = rf"(?:{APOS}|[`\u0091\u2018\u201B])"
WORD = rf"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
SREDAUX = rf"(?i:n){APOSETCETERA}(?i:t)"
APOWORD = (
    rf"{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:dunkin){APOS}|(?i:somethin){APOS}|(?i:ol){APOS}|{APOS}(?i:em)"
    rf"|[A-HJ-XZn]{APOSETCETERA}{_LETTER_ONLY}{{2}}{_LETTER_ONLY}*|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?)"
    rf"|{_LETTER_ONLY}+[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z]{_LETTER_ONLY}*|{APOS}(?i:cause)"
    rf"|(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:o){APOSETCETERA}(?i:o)"
)
FULLURL = r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"
LIKELYURL = (
    r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
    r"(?i:com|net|org|edu)))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"
)
EMAIL = (
    r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
    r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:(?i:&gt;)|>)?"
)
NUM = rf"(?:{DIGIT}+|{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+)"
FILENAME = (
    rf"(?:{LETTER}|{DIGIT})+(?:\.(?:{LETTER}|{DIGIT})+)*\.(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm"
    r"|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"
)
HYPHEN = r"[-_\u058A\u2010\u2011]"
THING_PART = rf"(?:[dDoOlL]{APOSETCETERA}{LETTER_OR_DIGIT})?{LETTER_OR_DIGIT}+"
THING = rf"{THING_PART}(?:{HYPHEN}{THING_PART})*"
SPAMP = r"(?i:&amp;)"
THINGA = rf"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+"
ACRO = r"[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|(?:{ACRO2})\.))+"
ABSTATE = (
    r"(?i:ala|ariz)|A(?i:z)|A(?i:rk)|(?i:calif|colo|conn|ct|dak)|D(?i:el)|(?i:fla|ga)|I(?i:ll)|(?i:ind|kans?|ky)"
    r"|L(?i:a)|M(?i:ass)|(?i:md|mich|minn)|M(?i:iss)|(?i:mo|mont|neb|nev|okla)|O(?i:re)|P(?i:a)|(?i:penn|tenn)"
    r"|T(?i:ex)|(?i:va|vt)|W(?i:ash)|(?i:wisc?|wyo)"
)
ABBREV1 = (
    r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri)|"
    + ABSTATE
    + r"|(?i:inc|cos?|corp)|(?i:pp?t)[ye](?i:s)?|(?i:ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq"
    r"|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg))\."
)
ABTITLE = (
    r"(?i:mr|mrs|ms)|M(?i:iss)|(?i:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt"
    r"|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme"
    r"|msgr|sfc)"
)
ABBREV4 = (
    rf"(?:{ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{ACRO}|(?i:invt|elec|natl)|(?i:m)[ft](?i:g)|(?i:dept))"
)
# Words after which an acronym ends its sentence: upper-case first letter (a character class), the rest caseless.
ACRONYM_FOLLOWERS = "|".join(
    f"{word[0]}(?i:{word[1:]})" if len(word) > 1 else word
    for word in (
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
        r"Mr\. Ms\. Now Once One Other Our She Since So Some Such That The Their Then There These They This We "
        "When While What Yet You"
    ).split()
)
PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}[\- \u00A0]?"
    r"[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
)
INSENTP = r"[,;:\u3001]"
QUOTES = (
    rf"{APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB"
    r"\u00BB]{1,2}"
)
DBLQUOT = r"(?:\"|(?i:&quot;))"
MISCSYMBOL = (
    r"[+%&~\^|\\¦\u00A7¨\u00A9\u00AC\u00AE¯\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05C6"
    r"\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8"
    r"\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F"
    r"\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40"
    r"\uFF5B-\uFF65]"
)

# What a rule does with its text: the token(s) it makes (None: none) and how many characters it consumes.
Action = Callable[[str], tuple[list[str], int]]


def _keep(text: str) -> tuple[list[str], int]:
    """The rule's text as it is."""
    return [text], len(text)


def _skip(text: str) -> tuple[list[str], int]:
    """No token (white space)."""
    return [], len(text)


def _as(token: str) -> Action:
    """The rule's text becomes `token`."""
    return lambda text: ([token], len(text))


def _pushback(count: int) -> Action:
    """The token without its last `count` characters, which are lexed again ("cannot" -> "can", "not")."""
    return lambda text: ([text[:-count]], len(text) - count)


def _mapped(transform: Callable[[str], str]) -> Action:
    """The rule's text, transformed."""
    return lambda text: ([transform(text)], len(text))


def _period_again(text: str) -> tuple[list[str], int]:
    """An abbreviation that may end the sentence: the token keeps its period, which also becomes one."""
    return [text], len(text) - 1


def _acronym(text: str) -> tuple[list[str], int]:
    """An acronym before a sentence-starting word: "I." gives "I" and "."; "U.S." gives "U.S." and "."."""
    return ([text[:-1]] if len(text) == 2 else [text]), len(text) - 1


_LEFT_QUOTES = [("[\u0091\u2018\u201b\u2039]", "`"), ("[\u0092\u2019\u203a]", "'")]
_DOUBLE_QUOTES = [("[\u0093\u201c\u00ab]", "``"), ("[\u0094\u201d\u00bb]", "''")]


def _latex_quotes(probably_left: bool) -> Action:
    """The lexer's latexQuotes: ASCII quotes by their likely side, then the curly ones by theirs."""

    def quote(text: str) -> str:
        text = re.sub("&apos;|'", "`" if probably_left else "'", text)
        text = re.sub('"|&quot;', "``" if probably_left else "''", text)
        for pattern, replacement in _LEFT_QUOTES + _DOUBLE_QUOTES:
            text = re.sub(pattern, replacement, text)
        return text

    return _mapped(quote)


def _without_soft_hyphens(text: str) -> str:
    """The text without soft hyphens (never empty)."""
    return text.replace("\u00ad", "") or "-"


def _non_breaking(text: str) -> str:
    """Spaces inside a token become non-breaking ones, so the token stays one."""
    return text.replace(" ", "\u00a0")


def _parentheses(text: str) -> str:
    """PTB's names for round brackets."""
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _ampersand(text: str) -> str:
    """The &amp; entity as &."""
    return re.sub("(?i:&amp;)", "&", text)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = [("\u00a2", "cents"), ("\u00a3", "#"), ("[\u0080\u00a4\u20a0\u20ac]", "$")]


def _dashes(text: str) -> str:
    """Three or four hyphens are a dash, "--"; others stay."""
    return "--" if 3 <= len(text) <= 4 else text


def _currency(text: str) -> str:
    """The lexer's currency signs: cents, # for pounds, $ for the rest."""
    for pattern, replacement in _CURRENCY:
        text = re.sub(pattern, replacement, text)
    return text


# (pattern, trailing context or None, action), in the lexer's order; YyTraditionalTreebank3's rules only.
_RULES: list[tuple[str, str | None, Action]] = [
    (r"(?i:c\+\+)", None, _keep),
    (r"(?i:c|f)#", None, _keep),
    (r"(?i:cannot)", None, _pushback(3)),
    (r"(?i:'twas)", None, _pushback(3)),
    (r"(?i:'tis)", None, _pushback(2)),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", None, _pushback(2)),
    (SGML, None, _mapped(_non_breaking)),
    (r"(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", None, _as("--")),
    (SPAMP, None, _mapped(_ampersand)),
    (r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", None, _keep),
    (WORD, REDAUX, _mapped(_without_soft_hyphens)),
    (SWORD, SREDAUX, _mapped(_without_soft_hyphens)),
    (WORD, None, _mapped(_without_soft_hyphens)),
    (APOWORD, None, _keep),
    (r"(?i:y)" + APOS, _LETTER_ONLY, _keep),
    (FULLURL, None, _keep),
    (LIKELYURL, None, _keep),
    (EMAIL, None, _keep),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", None, _keep),
    (REDAUX, "[^A-Za-z]", _latex_quotes(False)),
    (SREDAUX, "[^A-Za-z]", _latex_quotes(False)),
    (rf"{DIGIT}{{1,2}}[\-/]{DIGIT}{{1,2}}[\-/]{DIGIT}{{2,4}}", None, _keep),
    (rf"[\-+]?{NUM}", None, _mapped(_without_soft_hyphens)),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)", None, _keep),
    (rf"(?:{DIGIT}{{1,4}}[- \u00A0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}}", None, _mapped(_non_breaking)),
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, _mapped(lambda text: _FRACTIONS.get(text, text))),
    (
        rf"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)|(?i:cap){APOS}(?i:n)"
        rf"|(?i:c){APOS}(?i:est)",
        None,
        _mapped(_ampersand),
    ),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, _keep),
    (r"[A-Z]*\$|#", None, _keep),
    (
        r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
        None,
        _mapped(_currency),
    ),
    (rf"(?:{ACRO})\.", rf"{SPACENL}+(?:{ACRONYM_FOLLOWERS}|{SGML}){SPACENL}", _acronym),
    (r"(?i:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\.", rf"{SPACENL}?{DIGIT}", _keep),
    (r"(?i:pt[ey]|co)\.", rf"{SPACE}(?i:ltd|lim)", _keep),
    (ABBREV1, rf"{SPACENL}(?:{SPACENL}|{_UPPERCASE}|{SGML})", _period_again),
    (ABBREV1, r"(?s:..)", _keep),
    (ABBREV1, None, _period_again),
    (ABBREV4 + r"\.", None, _keep),
    (ABBREV4, SPACE, _keep),
    (ACRO, SPACENL, _keep),
    (APOS + "[0-9][0-9]", SPACENL, _keep),
    (FILENAME, rf"{SPACENL}|[.?!,]", _keep),
    (WORD + r"\.", INSENTP, _mapped(_without_soft_hyphens)),
    (PHONE, None, _mapped(lambda text: _parentheses(_non_breaking(text)))),
    (DBLQUOT, "[A-Za-z0-9$]", _latex_quotes(True)),
    (DBLQUOT, None, _latex_quotes(False)),
    ("\x7f", None, _skip),
    (r"<|(?i:&lt;)", None, _as("<")),
    (r">|(?i:&gt;)", None, _as(">")),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", "[^A-Za-z0-9]", _mapped(_parentheses)),
    (
        r"[\^x=~<>]\.\[\^x=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)",
        None,
        _mapped(_parentheses),
    ),
    (r"\{", None, _as("-LCB-")),
    (r"\}", None, _as("-RCB-")),
    (r"\[", None, _as("-LSB-")),
    (r"\]", None, _as("-RSB-")),
    (r"\(", None, _as("-LRB-")),
    (r"\)", None, _as("-RRB-")),
    (r"-+", None, _mapped(_dashes)),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, _as("...")),
    (r"@+|#+|_+", None, _keep),
    (r"\*+|(?:\\\*){1,3}", None, _keep),
    (INSENTP, None, _keep),
    (r"[?!]+", None, _keep),
    (r"[.¡¿\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
    ("=", None, _keep),
    ("/", None, _keep),
    (HTHING + r"\.", INSENTP, _mapped(_without_soft_hyphens)),
    (HTHING, None, _mapped(_without_soft_hyphens)),
    (THING + r"\.", INSENTP, _keep),
    (THING, None, _keep),
    (THINGA + r"\.", INSENTP, _mapped(_ampersand)),
    (THINGA, None, _mapped(_ampersand)),
    ("'", r"[A-Za-z][^ \t\n\r\u00A0]", _latex_quotes(True)),
    (REDAUX, None, _latex_quotes(False)),
    (SREDAUX, None, _latex_quotes(False)),
    (QUOTES, None, _latex_quotes(False)),
    (r"<<|>>", None, _keep),
    (MISCSYMBOL, None, _keep),
    (r"\x00|[ \t\u00A0\u2000-\u200A\u3000]+|[\u200B\u200E\u200F\uFEFF]", None, _skip),
    (r"(?i:&nbsp;)", None, _skip),
]


@functools.cache
def _compiled_rules() -> list[tuple[regex.Pattern, Action]]:
    """The rules compiled, on first use (a fifth of a second: training without --scst does not pay it).

    A rule's text is group "token"; what follows it in the match is its trailing context. POSIX matching
    finds a rule's longest match, as the lexer's automaton does (re would take the first alternative)."""
    return [
        (regex.compile(f"(?P<token>{pattern})" + (f"(?:{context})" if context else ""), regex.POSIX), action)
        for pattern, context, action in _RULES
    ]


# Shortcuts where the lexer's answer is known: ASCII words, each before a space, or before a comma (or
# ; : ! ?) and a space, are each a token (no rule makes a longer match or another token of one, except
# the assimilations); white space is none; lone punctuation is itself.
_PLAIN_WORDS = regex.compile(r"(?:[A-Za-z]+ )*[A-Za-z]+(?=[ \n]|[,;:!?][ \n])")
_ASSIMILATION = regex.compile(r"(?i:cannot|gonna|gotta|lemme|gimme|wanna)(?![A-Za-z])")
_PLAIN_PUNCTUATION = regex.compile(r"[.,;:!?](?=[ \n])")
_SPACES = regex.compile(r" +")


def ptb_tokens(line: str) -> list[str]:
    """The tokens PTBTokenizer -preserveLines -lowerCase makes of one line (no line breaks in it)."""
    text = line + "\n\n"  # as if an empty line followed: the lexer looks ahead, across lines too
    tokens: list[str] = []
    position, end = 0, len(line)
    while position < end:
        if spaces := _SPACES.match(text, position):
            position = spaces.end()
            continue
        words = _PLAIN_WORDS.match(text, position)
        if words and not _ASSIMILATION.search(words.group()):
            tokens.extend(words.group().lower().split(" "))
            position = words.end()
            continue
        if punctuation := _PLAIN_PUNCTUATION.match(text, position):
            made, consumed = [punctuation.group()], 1
        else:
            rest = text[position:]
            made, consumed = (_cached_longest_match if len(rest) <= CACHED_REST else _longest_match)(rest)
        tokens.extend(token.lower() for token in made)
        position += consumed
    return tokens


@functools.lru_cache(maxsize=2**12)  # bounded: a caption may hold any of Unicode's characters
def _rules_starting_with(character: str) -> list[tuple[regex.Pattern, Action]]:
    """The rules whose match can begin with `character` (regex's partial matching says)."""
    return [(pattern, action) for pattern, action in _compiled_rules() if pattern.match(character, partial=True)]


def _longest_match(text: str) -> tuple[list[str], int]:
    """The tokens of the rule with the longest match at the start of `text` (the earlier one of equals), and
    the characters they consume; a character that no rule matches is dropped, as the lexer's default
    (untokenizable=firstDelete) does."""
    best, best_length = None, 0
    for pattern, action in _rules_starting_with(text[0]):
        match = pattern.match(text)
        if match is not None and match.end() > best_length:
            best, best_length = (match.group("token"), action), match.end()
    if best is None:
        return [], 1
    token, action = best
    return action(token)


# The lexer looks only ahead, so a position's token depends on the text from there on alone: the same
# caption ending ("... on a surfboard.") is lexed once. Only short rests are cached, and a bounded number of
# them, so that the training set's captions (of --max_caption_chars) cannot fill memory with their suffixes.
CACHED_REST = 64  # characters
_cached_longest_match = functools.lru_cache(maxsize=2**14)(_longest_match)
