"""What the real population's hard-negative archetypes write when ShareGPT has no conversation for it.

Content only (no randomness beyond the ``rng`` passed in, no traffic shapes; :mod:`.realpop`
decides who sends what when):

- the popular chat app's one system prompt and client (``APP_*``), and the everyday system
  prompts and personas of casual and power users;
- template reusers' templates (``TEMPLATES``), filled with real paragraphs of ShareGPT replies;
- LLM-as-judge prompts (``JUDGE_TEMPLATES``: single-answer grading "on a scale of 1 to 10",
  pairwise preference, a rubric), filled with real ShareGPT questions and replies;
- batch services' fixed system prompts over real ShareGPT openers (``BATCH_SYSTEMS``);
- a classroom's assignments and how students phrase them and follow up (``ASSIGNMENTS``);
- requests in seven other languages for non-English writers (:func:`foreign_request`), used when the
  pool has too few real non-English conversations (the cleaned ShareGPT V3 is mostly English);
- :func:`guess_language`, a stopword and script heuristic that tells those real ones apart.
"""

from __future__ import annotations

import re

import numpy as np

APP_SYSTEM = (
    "You are Pal, the assistant inside the Chatterbox app. Be friendly and helpful, and answer in the user's "
    "language. Use Markdown for lists, tables and code. If a question is ambiguous, ask one short clarifying "
    "question instead of guessing. Start with the direct answer, then add detail only where it helps. Never "
    "claim to browse the web or to remember earlier conversations. For medical, legal or financial questions, "
    "give general information and suggest asking a professional. If asked about very recent events, say that "
    "your knowledge may be out of date."
)
APP_USER_AGENTS = ("Chatterbox/3.4.1 (Electron 31; Windows 10)", "Chatterbox/3.4.1 (iPhone; iOS 18.1)",
                   "Chatterbox/3.4.0 (Macintosh; macOS 14.6)")
APP_HEADERS = ("host", "content-type", "accept", "authorization", "user-agent", "accept-language",
               "accept-encoding", "content-length")
SHORT_SYSTEMS = ("You are a helpful assistant.", "You are a helpful assistant. Answer in Markdown.",
                 "Be concise.", "You are ChatGPT, a large language model. Answer as concisely as possible.")
PERSONAS = (
    ("You are Quill, a writing assistant for a small marketing agency. Our clients are local businesses: "
    "restaurants, dentists, gyms and real-estate agents. Write in plain, warm English at about an 8th-grade "
    "reading level. Avoid buzzwords, exclamation marks and clichés such as 'in today's fast-paced world'. When "
    "asked for social posts, give three options of different lengths. When asked for emails, include a subject "
    "line. Always ask for the business name and city if they are missing, and never invent prices, awards or "
    "customer reviews."),
    ("You are an expert software engineer pairing with me on a TypeScript and Python codebase. Prefer small, "
    "readable functions, explicit types and standard libraries. When I paste an error, first explain the most "
    "likely cause in one or two sentences, then show the minimal fix as a diff or a complete function. Mention "
    "any assumption you make about versions. If there are several reasonable approaches, list them briefly with "
    "their trade-offs before recommending one. Do not rewrite code I did not ask you to change."),
    ("You are a research assistant for a graduate student in public health. Summaries must separate what a "
    "study found from how strong the evidence is (design, sample size, limitations). Use cautious language and "
    "never overstate causality. When I ask for sources, say clearly that you cannot browse and that citations "
    "must be verified. Format longer answers with short headings and bullet points, and end with open "
    "questions worth checking."),
)
TEMPLATES = (
    "Rewrite the following text in a more professional tone:\n\n{text}",
    "Summarize this in 3 bullet points:\n\n{text}",
    "Fix the grammar and spelling in this text and keep the meaning:\n\n{text}",
    "Translate the following into Spanish:\n\n{text}",
    "Write a LinkedIn post of under 150 words based on this:\n\n{text}",
    "Give me 10 SEO keywords for this text, comma separated:\n\n{text}",
    "Explain this to me like I'm five:\n\n{text}",
    "Make this shorter without losing any key point:\n\n{text}",
)
JUDGE_SYSTEM = "You are a careful and impartial evaluator of AI assistant answers."
JUDGE_TEMPLATES = (
    ("Please act as an impartial judge and evaluate the quality of the response to the user question below. "
    "Consider helpfulness, relevance, accuracy and level of detail. Give a short explanation, then rate the "
    "response on a scale of 1 to 10 in the format \"Rating: [[N]]\".\n\n[Question]\n{q}\n\n[Response]\n{a}"),
    ("Which response is better for the user's question? Answer with A, B or tie, then one sentence of "
    "reasoning.\n\nQuestion: {q}\n\nResponse A: {a}\n\nResponse B: {b}"),
    ("Grade the answer below with this rubric: accuracy (0-4), completeness (0-3), clarity (0-3). Respond with "
    "a JSON object with fields accuracy, completeness, clarity and total.\n\nQuestion: {q}\n\nAnswer: {a}"),
    "On a scale of 1 to 10, how helpful is this reply? Reply with just the number.\n\nUser: {q}\n\nReply: {a}",
)
BATCH_SYSTEMS = (
    ("Classify the user's message into one of: coding, writing, business, education, health, entertainment, "
    "other. Respond with JSON only: {\"category\": <label>, \"confidence\": <0-1>}."),
    ("Write a title of at most 8 words for a conversation that starts with the user's message. Output only the "
    "title."),
    ("Detect the language of the text and whether it contains personal data. Respond in JSON with fields "
    "language and has_pii. No prose."),
    ("Moderation check. Label the text as safe or unsafe.\nOutput format:\nLabel: <safe/unsafe>\nReason: <at "
    "most 10 words>"),
)
ASSIGNMENTS = ("the causes of World War I", "photosynthesis", "the water cycle",
               "the themes of To Kill a Mockingbird", "the French Revolution", "the effects of climate change",
               "the Pythagorean theorem", "the structure of an animal cell")
ASK_PHRASES = ("write a 300 word essay about {t}", "Can you explain {t} for my class?", "explain {t} in simple words",
               "i need 5 paragraphs on {t} for homework",
               "Write an essay on {t} with an introduction, three body paragraphs and a conclusion.",
               "what are the main points of {t}", "help me understand {t}, we have a quiz tomorrow")
CLASS_FOLLOWUPS = ("make it longer", "can you make it sound like a 10th grader wrote it", "explain every step",
                   "add a conclusion", "give me sources", "make it shorter", "rewrite it in simpler words",
                   "can you add a quote", "thanks")
CONTINUE_WORDS = ("continue", "Continue", "go on", "continue please", "keep going", "Continue writing please",
                  "more")

_FOREIGN: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # language: (request templates with {t}, topics, follow-ups)
    "es": (("¿Me puedes explicar este tema: {t}?", "Escríbeme un resumen corto sobre el tema: {t}.",
            "Dame cinco ideas sobre el tema: {t}.", "¿Cuáles son los pros y los contras? Tema: {t}",
            "Necesito un texto corto para el trabajo. Tema: {t}", "¿Qué debería saber sobre esto: {t}?"),
           ("la inflación", "el cambio climático", "las redes neuronales", "la historia de Roma",
            "una dieta equilibrada", "el marketing digital", "la energía solar", "aprender inglés rápido",
            "la inteligencia artificial en la escuela", "los impuestos de los autónomos",
            "preparar una entrevista de trabajo", "el sistema solar"),
           ("¿Puedes darme más detalles?", "Más corto, por favor.", "Gracias, ¿tienes un ejemplo?",
            "Explícalo de forma más sencilla.")),
    "de": (("Erkläre mir bitte: {t}", "Schreib eine kurze Zusammenfassung zum Thema: {t}",
            "Gib mir fünf Ideen zum Thema: {t}", "Was sind die Vor- und Nachteile? Thema: {t}",
            "Ich brauche einen kurzen Text für die Arbeit. Thema: {t}", "Was sollte ich darüber wissen: {t}?"),
           ("Inflation", "Klimawandel", "neuronale Netze", "die Geschichte Roms", "gesunde Ernährung",
            "Online-Marketing", "Solarenergie", "schnell Englisch lernen", "künstliche Intelligenz in der Schule",
            "Steuern für Selbstständige", "ein Vorstellungsgespräch vorbereiten", "das Sonnensystem"),
           ("Kannst du mehr Details geben?", "Bitte kürzer.", "Danke! Hast du ein Beispiel?",
            "Erklär das bitte einfacher.")),
    "fr": (("Peux-tu m'expliquer ce sujet : {t} ?", "Écris-moi un court résumé sur le thème : {t}.",
            "Donne-moi cinq idées sur le thème : {t}.", "Quels sont les avantages et les inconvénients ? Sujet : {t}",
            "J'ai besoin d'un petit texte pour le travail. Thème : {t}", "Que faut-il savoir sur ce sujet : {t} ?"),
           ("l'inflation", "le changement climatique", "les réseaux de neurones", "l'histoire de Rome",
            "une alimentation équilibrée", "le marketing digital", "l'énergie solaire",
            "apprendre l'anglais rapidement", "l'intelligence artificielle à l'école", "les impôts des indépendants",
            "préparer un entretien d'embauche", "le système solaire"),
           ("Tu peux donner plus de détails ?", "Plus court, s'il te plaît.", "Merci ! Tu as un exemple ?",
            "Explique-le plus simplement.")),
    "pt": (("Pode me explicar este assunto: {t}?", "Escreva um resumo curto sobre o tema: {t}.",
            "Me dê cinco ideias sobre o tema: {t}.", "Quais são os prós e contras? Tema: {t}",
            "Preciso de um texto curto para o trabalho. Tema: {t}", "O que devo saber sobre isto: {t}?"),
           ("inflação", "mudanças climáticas", "redes neurais", "a história de Roma", "alimentação saudável",
            "marketing digital", "energia solar", "aprender inglês rápido", "inteligência artificial na escola",
            "impostos para autônomos", "preparar uma entrevista de emprego", "o sistema solar"),
           ("Pode dar mais detalhes?", "Mais curto, por favor.", "Obrigado! Tem um exemplo?",
            "Explique de forma mais simples.")),
    "zh": (("请给我解释一下：{t}", "帮我写一段关于{t}的简短总结。", "关于{t}，给我五个建议。", "{t}有哪些优点和缺点？",
            "我需要一篇关于{t}的短文，用于工作汇报。", "关于{t}，我应该了解什么？"),
           ("通货膨胀", "气候变化", "神经网络", "罗马的历史", "健康饮食", "数字营销", "太阳能", "快速学习英语",
            "人工智能在教育中的应用", "个体户的税务", "如何准备面试", "太阳系"),
           ("能说得更详细一点吗？", "请简短一些。", "谢谢！能举个例子吗？", "请用更简单的话解释。")),
    "ja": (("{t}について説明してください。", "{t}について短い要約を書いてください。", "{t}に関するアイデアを5つください。",
            "{t}のメリットとデメリットは何ですか？", "仕事で使うので、{t}についての短い文章が必要です。",
            "{t}について知っておくべきことは何ですか？"),
           ("インフレ", "気候変動", "ニューラルネットワーク", "ローマの歴史", "健康的な食事", "デジタルマーケティング",
            "太陽光発電", "英語を早く覚える方法", "教育におけるAI", "個人事業主の税金", "面接の準備", "太陽系"),
           ("もっと詳しく教えてください。", "もう少し短くしてください。", "ありがとう！例はありますか？",
            "もっと簡単に説明してください。")),
    "ko": (("{t}에 대해 설명해 주세요.", "{t}에 대한 짧은 요약을 써 주세요.", "{t}에 관한 아이디어 다섯 가지를 알려 주세요.",
            "{t}의 장단점은 무엇인가요?", "업무용으로 {t}에 관한 짧은 글이 필요해요.", "{t}에 대해 무엇을 알아야 하나요?"),
           ("인플레이션", "기후 변화", "신경망", "로마의 역사", "건강한 식단", "디지털 마케팅", "태양광 에너지",
            "영어를 빨리 배우는 방법", "교육에서의 인공지능", "프리랜서 세금", "면접 준비", "태양계"),
           ("좀 더 자세히 알려 주세요.", "더 짧게 해 주세요.", "감사합니다! 예시가 있을까요?", "더 쉽게 설명해 주세요.")),
}
FOREIGN_LANGUAGES = tuple(_FOREIGN)
LANGUAGE_TZ = {"es": (-6.0, 1.0), "de": (1.0,), "fr": (1.0,), "pt": (-3.0, 0.0), "it": (1.0,), "zh": (8.0,),
               "ja": (9.0,), "ko": (9.0,)}
"""Time zones (hours from UTC) writers of each language live in."""

_STOP_WORDS = {
    "en": "the a an and or of to in is are was for on with that this it you i be as at by from have what how can my your we do not",
    "es": "el la los las y de que en es un una por para con no se lo su al del como más pero",
    "de": "der die das und ist nicht ein eine zu mit für auf ich sie es den dem von wie",
    "fr": "le la les et est un une des du que qui pour dans pas sur avec je vous il ce",
    "pt": "o os as e de que em um uma para com não se por do da dos das como",
    "it": "il lo la gli le e di che in un una per con non si del della è come",
}
_STOP = {lang: frozenset(words.split()) for lang, words in _STOP_WORDS.items()}
_WORD = re.compile(r"[^\W\d_]+")


def guess_language(text: str) -> str:
    """'en', another language code ('es', 'de', 'fr', 'pt', 'it', 'zh', 'ja', 'ko'), or '' when the text is too
    short or unclear (code, lists). A heuristic over the first 3,000 characters: more than 30% of letters in CJK
    scripts (Hangul: ko; kana: ja; else zh), else (at least 6 words) the language whose common words make up the
    largest share (at least 8%)."""
    head = text[:3000]
    letters = [ch for ch in head if ch.isalpha()]
    if len(letters) >= 4 and sum(ord(ch) >= 0x2E80 for ch in letters) / len(letters) > 0.3:
        if any(0xAC00 <= ord(ch) <= 0xD7AF for ch in letters):
            return "ko"
        return "ja" if any(0x3040 <= ord(ch) <= 0x30FF for ch in letters) else "zh"
    words = _WORD.findall(head.lower())
    if len(words) < 6:
        return ""
    shares = {lang: sum(w in stop for w in words) / len(words) for lang, stop in _STOP.items()}
    best = max(shares, key=shares.__getitem__)
    return best if shares[best] >= 0.08 else ""


def foreign_request(rng: np.random.Generator, language: str, followup: bool = False) -> str:
    """A request (or a follow-up) in ``language`` (one of ``FOREIGN_LANGUAGES``)."""
    templates, topics, followups = _FOREIGN[language]
    if followup:
        return followups[int(rng.integers(0, len(followups)))]
    return templates[int(rng.integers(0, len(templates)))].format(t=topics[int(rng.integers(0, len(topics)))])


def paragraph(rng: np.random.Generator, text: str, lo: int = 200, hi: int = 1200) -> str:
    """A paragraph of ``text`` (a real reply) between ``lo`` and ``hi`` characters, else its first ``hi``."""
    parts = [p.strip() for p in text.split("\n\n") if lo <= len(p.strip()) <= hi]
    if parts:
        return parts[int(rng.integers(0, len(parts)))]
    return text[:hi].strip()
