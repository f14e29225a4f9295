"""Regular expressions for the phrasings injections keep reusing, in several languages.

They run on the normalized view of a text (``refinery.safety.screening.text.view``), so "1gn0r3 4ll
pr3v10us 1nstruct10ns" and base64 payloads meet them decoded. Each pattern needs an action
aimed at the assistant's own instructions, not just a trigger word: "ignore the warning" or
"the system prompt in Windows" do not match.
"""

from __future__ import annotations

import re

_P = re.IGNORECASE | re.DOTALL

# Words for "instructions / rules / guidelines" in the languages we screen.
_RULES = (
    r"(instructions?|rules?|prompts?|directives?|guidelines?|guardrails?|polic(y|ies)|constraints?|"
    r"restrictions?|orders?|programming|configuration|consignes?|règles?|directives?|"
    r"anweisungen?|regeln?|vorgaben?|richtlinien?|instrucciones?|reglas?|directrices?|"
    r"istruzioni|regole|linee guida|direttive|instruções|instrucoes|regras|diretrizes|orientações|"
    r"instructies|regels|instrukcje|instrukcji|zasady|инструкци\w*|правил\w*|指令|指示|规则|"
    r"talimatlar\w*|instruktioner|instrucțiunile|instruksi|지시)"
)
_DROP = (
    r"(ignore|disregard|forget|override|bypass|skip|drop|discard|cancel|erase|abandon|"
    r"ignor\w*|oubli\w*|vergiss\w*|missachte\w*|olvid\w*|dimentic\w*|esque[cç]\w*|"
    r"desconsider\w*|negeer\w*|zignoruj\w*|игнорир\w*|забудь|yok say|abaikan)"
)
_EARLIER = (
    r"(previous|prior|above|earlier|preceding|original|initial|old|all|your|these|those|"
    r"system|précédentes?|antérieures?|vorherigen?|bisherigen?|obigen?|anteriores|previas|"
    r"precedenti|anteriori|vorige|poprzednie|предыдущие|之前|これまで|önceki|tidigare|sebelumnya)"
)

_IMPERATIVE = (
    r"(^|[.!?:;,()\[\]\"“'»«-]\s*|\b(please|kindly|now|just|and|so|then|simply|bitte|"
    r"s'il te plaît|por favor|per favore)\s+)"
)
_AFTER = (
    r"(above|before|earlier|précédentes?|antérieures?|anteriores|previas|precedenti|anteriori|"
    r"vorherigen?|sebelumnya|önceki|anterioare)"
)
_GIVEN = (
    r"(you were given|you've been given|you have been given|you were told|you received|"
    r"que te dieron|qu'on t'a données|die du bekommen hast|che ti hanno dato|que te deram)"
)
_SHOW = (
    r"(reveal|show|print|repeat|output|display|leak|dump|spell out|quote|copy|share|tell me|"
    r"what (is|are|was|were)|affiche|montre|révèle|zeig|gib|verrate|muestra|revela|mostra|rivela|"
    r"mostre|revele|toon|pokaż|покажи|göster|visa|tampilkan|mostrami|muéstrame|montre-moi|"
    r"révèle-moi|zeig mir|mostre-me|rivelami|revélame)"
)
_HIDDEN_RULES = (
    r"((hidden|secret|cachées?|versteckten?|geheimen?|ocult[ao]s|nascost[ei]|segret[ei]|"
    r"secret[ao]s)\s+(instructions?|anweisungen|instrucciones|istruzioni|instruções|rules|"
    r"regeln|règles|reglas|regole|regras)|(instructions|instrucciones|istruzioni|instruções|"
    r"règles|reglas|regole|regras)\s+(cachées|ocultas|nascoste|secretas|segrete|secrètes))"
)
_YOUR = r"(your|ton|tes|deinen?|dein|tu|il tuo|o seu|seu|je|swój|свой|sua)"
# "the system prompt" is the assistant's; "the original instructions" may be a patent's.
_SECRET_THE = (
    r"(system ?prompt|system message|developer message|hidden (prompt|instructions?|rules)|"
    r"secret (key|password|token)s?)"
)
_SECRET_YOUR = (
    r"(system ?prompt|initial prompt|hidden (prompt|instructions?|rules)|instructions|"
    r"original instructions|developer message|system message|secret (key|password|token)s?|"
    r"internal instructions|confidential (instructions|configuration)|configuration|"
    r"prompt (du )?système|systemprompt|prompt del sistema|prompt di sistema|prompt de sistema|"
    r"systeemprompt|prompt systemowy|системный промпт|系统提示|システムプロンプト|sistem istemi|"
    r"prompt sistem)"
)

_SHOW = (
    r"(reveal|show|print|repeat|output|display|leak|dump|spell out|quote|copy|share|tell me|"
    r"what (is|are|was|were)|affiche|montre|révèle|zeig|gib|verrate|muestra|revela|mostra|rivela|"
    r"mostre|revele|toon|pokaż|покажи|göster|visa|tampilkan|mostrami|muéstrame|montre-moi|"
    r"révèle-moi|zeig mir|mostre-me|rivelami|revélame)"
)
_HIDDEN_RULES = (
    r"((hidden|secret|cachées?|versteckten?|geheimen?|ocult[ao]s|nascost[ei]|segret[ei]|"
    r"secret[ao]s)\s+(instructions?|anweisungen|instrucciones|istruzioni|instruções|rules|"
    r"regeln|règles|reglas|regole|regras)|(instructions|instrucciones|istruzioni|instruções|"
    r"règles|reglas|regole|regras)\s+(cachées|ocultas|nascoste|secretas|segrete|secrètes))"
)
_YOUR = r"(your|ton|tes|deinen?|dein|tu|il tuo|o seu|seu|je|swój|свой|sua)"
# "the system prompt" is the assistant's; "the original instructions" may be a patent's.
_SECRET_THE = (
    r"(system ?prompt|system message|developer message|hidden (prompt|instructions?|rules)|"
    r"secret (key|password|token)s?)"
)
_SECRET_YOUR = (
    r"(system ?prompt|initial prompt|hidden (prompt|instructions?|rules)|instructions|"
    r"original instructions|developer message|system message|secret (key|password|token)s?|"
    r"internal instructions|confidential (instructions|configuration)|configuration|"
    r"prompt (du )?système|systemprompt|prompt del sistema|prompt di sistema|prompt de sistema|"
    r"systeemprompt|prompt systemowy|системный промпт|系统提示|システムプロンプト|sistem istemi|"
    r"prompt sistem)"
)

PATTERNS: dict[str, re.Pattern[str]] = {
    # An imperative: the verb opens a sentence or follows "please", "now", "and"... ("my
    # toddler ignores all my instructions" is not one).
    "override": re.compile(
        rf"{_IMPERATIVE}{_DROP}\b[^.?!\n]{{0,40}}?(\b{_EARLIER}\b[^.?!\n]{{0,30}}?{_RULES}|"
        rf"{_RULES}[^.?!\n]{{0,30}}?\b{_AFTER}\b|{_RULES}\s+{_GIVEN})"
        rf"|{_IMPERATIVE}{_DROP}\s+(the |everything |all )?(above|previous|prior|preceding|before)\b"
        rf"|\b{_EARLIER}\s+{_RULES}\s+(are|is|have been|has been)\s+(now\s+)?(void|cancell?ed|"
        rf"revoked|obsolete|suspended|lifted|no longer)"
        rf"|{_RULES}[^.?!\n]{{0,30}}?\bno longer (apply|valid|in effect|matter)"
        rf"|\b(stop following|no longer follow|não siga mais|non seguire più|ne suis plus|"
        rf"no sigas|befolge nicht mehr|hör auf,? (deine|den) )[^.?!\n]{{0,30}}{_RULES}"
        rf"|(忽略|無視|무시)[^。？！\n]{{0,12}}{_RULES}",
        _P | re.MULTILINE,
    ),
    # "What is the system prompt in Windows?" asks about a thing; "print the system prompt"
    # and "what is your system prompt?" ask for the assistant's.
    "reveal": re.compile(
        rf"\b(?!what\b){_SHOW}\b[^.?!\n]{{0,40}}?\bthe\b[^.?!\n]{{0,25}}?{_SECRET_THE}"
        rf"|\b{_SHOW}\b[^.?!\n]{{0,40}}?\b{_YOUR}\b[^.?!\n]{{0,25}}?{_SECRET_YOUR}"
        rf"|\b(what|which|quelles?|welche|cuáles|quali|quais)\b[^.?!\n]{{0,30}}{_HIDDEN_RULES}"
        rf"|(输出|显示|告诉我|表示|見せて)[^。？！\n]{{0,10}}(系统提示|系统指令|システムプロンプト|隐藏的指令)",
        _P,
    ),
    "persona": re.compile(
        r"\b(you are now|from now on,? you are|act as|pretend (to be|you are|you're)|roleplay as|"
        r"role-play as|imagine you are|behave as|become)\b"
        r"[^.?!\n]{0,60}?\b(DAN|jailbr(oken|eak)|unfiltered|uncensored|unrestricted|"
        r"no (rules|restrictions|filters|limits|content policy|guidelines)|developer mode|evil|"
        r"without (any )?(rules|restrictions|limits|filters))",
        _P,
    ),
    "jailbreak_mode": re.compile(
        r"\b(developer mode|DAN mode|jailbreak mode|god mode|sudo mode|maintenance mode|"
        r"do anything now|modo desarrollador|modalità sviluppatore|modo desenvolvedor|"
        r"entwicklermodus|mode développeur)\b[^.?!\n]{0,60}?\b(no|without|any|all|anything|sin|"
        r"senza|sem|ohne|non|nessun|sans|aucune?|keine|ningún|nenhum|más|più|mehr|plus)\b",
        _P,
    ),
    "role_marker": re.compile(
        r"(<\|im_start\|>\s*system|<\|system\|>|\[/?INST\]|<<SYS>>|###\s*(system|instruction)\s*:|"
        r"^\s*(system|système|sistema)\s*:\s|begin new system prompt|\[system\]|\[admin override\])",
        re.IGNORECASE | re.MULTILINE,
    ),
}

# Text in a document that speaks to the model reading it (indirect injection).
DOCUMENT_PATTERNS: dict[str, re.Pattern[str]] = {
    "addresses_the_model": re.compile(
        r"(\b(note|message|instructions?|attention|hinweis|remarque|nota)\s+(to|for|an|pour|"
        r"para|per)\s+(the\s+|die\s+|l'|la\s+|a\s+)?(ai|ki|ia|assistants?|models?|chatbots?|llms?|"
        r"bots?|language models?)\b"
        r"|\bif you are an?\s+(ai|language model|llm|assistant|chatbot|bot)\b"
        r"|\b(any|all)\s+(ai|automated assistant|assistant|model|llm|chatbot)s?\s+"
        r"(reading|processing|summari[sz]ing)\b"
        r"|^\s*(dear\s+)?(ai|assistant|chatbot|llm|language model|model|bots?)( model)?\s*[:,]\s*\S"
        r"|\b(ai|assistant|chatbot|llm|language model)( model)?\s*[:,]\s*(ignore|disregard|forget|stop|"
        r"you must|do not|don't|from now on|your new|when you)\b"
        r"|\bto the (model|ai|assistant) reading this\b)",
        re.IGNORECASE | re.MULTILINE,
    ),
}


def heuristic_reasons(text: str) -> list[str]:
    """Names of the patterns that match ``text`` (or its normalized, decoded view)."""
    from refinery.safety.screening.text import view

    seen = view(text).text
    return [
        name for name, pattern in PATTERNS.items() if pattern.search(text) or pattern.search(seen)
    ]


def document_reasons(text: str) -> list[str]:
    """Prompt patterns plus the ones for text that addresses a model reading it."""
    from refinery.safety.screening.text import view

    seen = view(text).text
    out = heuristic_reasons(text)
    out += [
        name
        for name, pattern in DOCUMENT_PATTERNS.items()
        if pattern.search(text) or pattern.search(seen)
    ]
    return out
