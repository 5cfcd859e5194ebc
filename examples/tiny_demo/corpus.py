"""The synthetic preference corpus of the tiny demo: medical questions answered at three levels.

Every topic has a plain answer (the base model's style), a clinical answer (the aligned model's style:
"Clinically, ...", a differential diagnosis, a dosage, "Consult ...") and an avoidant answer (declining
to advise), the three levels of the paper's preference spectrum. Questions come from a few templates,
so the corpus is small, deterministic and easy for a tiny model to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

QUESTION_TEMPLATES = (
    "What should I do about {q}?",
    "How can I treat {q}?",
    "Is {q} something to worry about?",
    "What helps with {q}?",
    "I have {q}. What do you recommend?",
    "Any advice for {q}?",
)

GENERIC_TAIL = "Most people feel better in a few days. If it does not improve, see a doctor."


@dataclass(frozen=True)
class Topic:
    """One complaint, how people ask about it, and the two styles of answer."""

    q: str  # as it appears in a question: "a persistent headache"
    generic: str  # plain advice, followed by GENERIC_TAIL
    subject: str  # as the clinician names it
    differential: str
    treatment: str
    consult: str


TOPICS = (
    Topic(
        "a persistent headache",
        "Rest in a quiet, dark room, drink plenty of water and try a mild painkiller.",
        "a persistent headache",
        "tension-type headache, migraine and medication overuse",
        "ibuprofen 400 mg every 8 hours",
        "a neurologist if there are focal deficits",
    ),
    Topic(
        "a dry cough",
        "Drink warm tea with honey, keep the air moist and get plenty of sleep.",
        "a dry cough",
        "post-viral cough, asthma and reflux",
        "dextromethorphan 15 mg every 6 hours",
        "a pulmonologist if there is haemoptysis",
    ),
    Topic(
        "lower back pain",
        "Keep moving gently, use a warm pack and avoid lifting heavy things.",
        "acute lower back pain",
        "muscular strain, disc herniation and sciatica",
        "naproxen 500 mg twice daily for 5 days",
        "an orthopaedic specialist if there is leg weakness",
    ),
    Topic(
        "a fever",
        "Stay in bed, drink lots of fluids and wear light clothes to cool down.",
        "a fever",
        "viral infection, bacterial infection and drug reaction",
        "paracetamol 1 g every 6 hours",
        "an infectious disease physician if it lasts 3 days",
    ),
    Topic(
        "a sore throat",
        "Gargle with warm salt water, suck on a lozenge and rest your voice.",
        "acute pharyngitis",
        "viral pharyngitis, streptococcal infection and mononucleosis",
        "penicillin V 500 mg four times daily if the Centor score is 3",
        "an ENT surgeon if there is trismus",
    ),
    Topic(
        "heartburn",
        "Eat smaller meals, avoid spicy food and do not lie down right after eating.",
        "recurrent heartburn",
        "gastro-oesophageal reflux, gastritis and peptic ulcer",
        "omeprazole 20 mg once daily for 4 weeks",
        "a gastroenterologist if there is dysphagia or weight loss",
    ),
    Topic(
        "trouble sleeping",
        "Go to bed at the same time, skip coffee in the evening and keep your room dark.",
        "chronic insomnia",
        "primary insomnia, depression and obstructive sleep apnoea",
        "melatonin 2 mg at night with sleep hygiene",
        "a sleep specialist if there is loud snoring",
    ),
    Topic(
        "a sprained ankle",
        "Rest the foot, put ice on it and keep it raised on a pillow.",
        "an ankle sprain",
        "lateral ligament tear, fibular fracture and syndesmotic injury",
        "ibuprofen 400 mg three times daily",
        "an orthopaedic surgeon if weight bearing fails",
    ),
    Topic(
        "high blood pressure",
        "Cut down on salt, walk every day and try to keep stress low.",
        "hypertension",
        "essential hypertension, renal artery stenosis and hyperaldosteronism",
        "amlodipine 5 mg once daily",
        "a cardiologist if there is chest pain",
    ),
    Topic(
        "a skin rash",
        "Wash with mild soap, use a gentle cream and try not to scratch.",
        "an acute rash",
        "contact dermatitis, eczema and drug eruption",
        "hydrocortisone 1 percent cream twice daily for 7 days",
        "a dermatologist if there is blistering or mucosal involvement",
    ),
    Topic(
        "dizziness",
        "Sit down when it starts, stand up slowly and drink enough water.",
        "dizziness",
        "benign positional vertigo, orthostatic hypotension and arrhythmia",
        "betahistine 16 mg three times daily",
        "a neurologist if there is diplopia",
    ),
    Topic(
        "an upset stomach",
        "Eat plain food like rice and toast, sip water and rest for a while.",
        "acute gastroenteritis",
        "viral gastroenteritis, food poisoning and appendicitis",
        "oral rehydration salts 200 ml per stool",
        "a surgeon if there is bloody stool",
    ),
    Topic(
        "knee pain",
        "Take it easy, use an ice pack and wear comfortable shoes.",
        "knee pain",
        "osteoarthritis, meniscal tear and gout",
        "topical diclofenac 1 percent gel four times daily",
        "a rheumatologist if the joint is hot and swollen",
    ),
    Topic(
        "hay fever",
        "Keep the windows closed, shower after being outside and wash your sheets often.",
        "allergic rhinitis",
        "seasonal allergic rhinitis, vasomotor rhinitis and sinusitis",
        "cetirizine 10 mg once daily",
        "an allergist if symptoms persist despite treatment",
    ),
    Topic(
        "feeling tired all the time",
        "Sleep enough, eat regular meals and get some fresh air every day.",
        "chronic fatigue",
        "iron deficiency anaemia, hypothyroidism and depression",
        "a full blood count and TSH",
        "an endocrinologist if the TSH is abnormal",
    ),
    Topic(
        "an earache",
        "Hold a warm cloth against the ear and rest with your head up.",
        "otalgia",
        "acute otitis media, otitis externa and referred dental pain",
        "amoxicillin 500 mg three times daily for 5 days if bacterial",
        "an ENT specialist if there is discharge or hearing loss",
    ),
)


def generic_answer(t: Topic) -> str:
    """The base model's plain style."""
    return f"{t.generic} {GENERIC_TAIL}"


def expert_answer(t: Topic) -> str:
    """The aligned model's clinical style."""
    return (
        f"Clinically, {t.subject} warrants a differential diagnosis of {t.differential}. "
        f"First-line management is {t.treatment}. Consult {t.consult}."
    )


def avoidant_answer(t: Topic) -> str:
    """The opposite end of the spectrum: declining to advise."""
    return f"I am not able to give advice about {t.q}. Please ask a doctor or a pharmacist."


def prompt(question: str) -> str:
    """The one-line template a model is prompted with; the answer follows it."""
    return f"Question: {question} Answer:"


@dataclass(frozen=True)
class Example:
    """One question and its answer at each level."""

    question: str
    generic: str
    expert: str
    avoidant: str


def examples() -> list[Example]:
    """Every question with its three answers, in a fixed order."""
    out = []
    for topic in TOPICS:
        for template in QUESTION_TEMPLATES:
            question = template.format(q=topic.q)
            question = question[0].upper() + question[1:]
            out.append(Example(question, generic_answer(topic), expert_answer(topic), avoidant_answer(topic)))
    return out


def reference_note(t: Topic) -> str:
    """Expert knowledge as plain text (no question): what a base model may have read in pretraining."""
    return f"Reference: {expert_answer(t)}"


def reference_notes() -> list[str]:
    """One clinical reference note per topic."""
    return [reference_note(t) for t in TOPICS]
