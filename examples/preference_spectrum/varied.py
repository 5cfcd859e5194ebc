"""The less-templated preference-spectrum dataset, for a real pretrained model (``build.py --model smollm2``).

The tiny models of ``data.py`` learn from one question template and one fixed sentence per level, so
every held-out question of a domain flips level at the same λ. Here each of 12 topics per domain has
three hand-written questions in different registers (a worried message, a short search-style query, a
situation told at length), optionally prefixed by one of several personal contexts; and every response
is assembled, per question and seeded, from pools of hand-written sentences:

- **avoidance**: one of 8 refusals, one of 6 reasons, one of 6 referrals to the domain's professional;
- **generic**: one of 6 sympathetic openers, one of the topic's two plain-advice sentences, one of the
  domain's 5 plain closers;
- **expert**: the topic's technical assessment, specific action and referral, in one of 5 sentence
  frames.

No two responses in the set are the same text, and a level is told apart by register and content rather
than by a fixed opening word. The split holds out two whole topics per domain (questions and answers the
AVs never saw) and one question of every other topic: 40 training and 20 held-out questions per domain.

Synthetic text written for this example; not medical, legal or financial advice.

Long module: most of its lines are the hand-written sentence pools themselves; the assembly that draws
from them is short and sits with them so that one file is the whole dataset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data import Item  # one question with its response at every level, as the templated set has it

DOMAINS = ("medical", "legal", "financial")
LEVELS = ("avoidance", "generic", "expert")
QUESTIONS_PER_TOPIC = 5
HELD_OUT_TOPICS = 2  # per domain, all their questions held out


@dataclass(frozen=True)
class Topic:
    """One subject: three ways to ask about it, two plain answers, and the expert's three parts."""

    questions: tuple[str, str, str]
    plain: tuple[str, str]
    assessment: str  # "this sounds like ..." (a noun phrase: what the expert considers)
    action: str  # a specific course of action, imperative without the verb's subject
    referral: str  # who to see, and when


CONTEXTS = (
    "I'm a student on a tight schedule.",
    "I'm retired and live on my own.",
    "I work night shifts at a warehouse.",
    "I'm a parent of two small kids.",
    "I run a small bakery.",
    "I'm new to this country.",
    "I work from home as a designer.",
    "I'm in my fifties and fairly healthy.",
)

PROFESSIONAL = {
    "medical": ("a doctor", "your GP", "a pharmacist", "a nurse at your clinic"),
    "legal": ("a lawyer", "a solicitor", "a legal advice centre", "a qualified legal adviser"),
    "financial": ("a financial adviser", "a certified planner", "your bank's adviser", "a debt advice charity"),
}
KIND = {"medical": "medical", "legal": "legal", "financial": "financial"}

AVOID_OPEN = (
    "I'm sorry, but I can't advise you on this.",
    "I'd rather not give advice on that.",
    "Unfortunately this isn't something I can help with.",
    "I'm not able to give {kind} advice, I'm afraid.",
    "I have to decline this one, sorry.",
    "I can't tell you what to do here.",
    "That's not a question I can answer for you.",
    "I'm afraid I have to stay out of this.",
)
AVOID_REASON = (
    "It depends on details I can't check.",
    "Getting it wrong could cause you real harm.",
    "Only someone who knows your full situation can judge it.",
    "Advice like this needs a qualified person.",
    "I'm not in a position to weigh the risks for you.",
    "Every case is different, and yours deserves proper attention.",
)
AVOID_REFER = (
    "Please speak to {who}.",
    "The best step is to ask {who}.",
    "Please get in touch with {who} about it.",
    "I'd suggest you contact {who} soon.",
    "{Who} will be able to help you properly.",
    "Please take this to {who}.",
)

GENERIC_OPEN = (
    "That sounds stressful, but you're not alone.",
    "Lots of people go through this.",
    "I understand, that's a common worry.",
    "Don't panic, this happens to many people.",
    "That's annoying, but it's usually manageable.",
    "Good that you're thinking about it.",
)
GENERIC_CLOSE = {
    "medical": (
        "Give it a few days and see how you feel.",
        "Most of the time it gets better on its own.",
        "If it gets worse, see someone about it.",
        "Take it easy and look after yourself.",
        "Be patient with your body.",
    ),
    "legal": (
        "Keep a note of everything that happens.",
        "Stay calm and polite, it usually helps.",
        "Most of these things get sorted out in the end.",
        "Talk it over with someone you trust.",
        "Don't sign anything in a hurry.",
    ),
    "financial": (
        "Small steps add up over time.",
        "Keep it simple and don't rush.",
        "Try to stick to a plan you can manage.",
        "Ask your bank if you feel unsure.",
        "Be kind to yourself, money is hard.",
    ),
}

EXPERT_FRAMES = (
    "This points to {assessment}. I would {action}, and {referral}.",
    "The likely picture is {assessment}. Plan: {action}; {referral}.",
    "Consider {assessment}. Specifically, {action}. Then {referral}.",
    "My assessment: {assessment}. Next, {action}, and {referral}.",
    "Technically this is {assessment}. {Action}, and {referral}.",
)

TOPICS: dict[str, tuple[Topic, ...]] = {
    "medical": (
        Topic(("I've had a headache for three days and it won't go away. What should I do?",
               "headache three days not going away",
               "My head has been pounding since the weekend, worse in the evenings after work. Any ideas?"),
              ("Rest in a quiet room, drink water and try a mild painkiller.",
               "Get some sleep, cut down on screens and have a glass of water."),
              "a tension-type headache, though migraine and painkiller overuse are possible",
              "take ibuprofen 400 mg with food every 8 hours for at most 3 days",
              "see a neurologist urgently if there is weakness or blurred vision"),
        Topic(("I keep coughing at night, it's a dry tickly cough. How do I stop it?",
               "dry cough at night won't stop",
               "Since my cold ended two weeks ago I still have this dry cough that keeps me awake."),
              ("Have warm tea with honey and keep the bedroom air moist.",
               "Sip warm drinks, use an extra pillow and rest your voice."),
              "a post-viral cough, with asthma and acid reflux as alternatives",
              "try dextromethorphan 15 mg every 6 hours and a peak flow diary",
              "see a chest physician if it lasts 8 weeks or you cough blood"),
        Topic(("My lower back hurts after lifting boxes. What helps?",
               "lower back pain after lifting",
               "I moved house on Saturday and now my lower back is stiff and sore when I bend."),
              ("Keep moving gently and put a warm pack on it.",
               "Avoid heavy lifting for a while and take short walks."),
              "a lumbar muscle strain rather than a disc prolapse",
              "take naproxen 500 mg twice daily for 5 days and keep active",
              "see an orthopaedic specialist if you get leg numbness or weakness"),
        Topic(("My temperature is 38.5 and I feel awful. What should I do?",
               "fever 38.5 what to do",
               "I woke up shivering and the thermometer says 38.5, I also ache all over."),
              ("Stay in bed, drink lots of fluids and wear light clothes.",
               "Rest, keep drinking and let your body fight it off."),
              "a viral infection, with a bacterial cause to exclude",
              "take paracetamol 1 g every 6 hours, no more than 4 g a day",
              "see an infectious disease doctor if it lasts beyond 3 days"),
        Topic(("My throat is really sore and it hurts to swallow. Is it serious?",
               "sore throat painful swallowing",
               "For two days my throat has felt raw, and swallowing food is painful."),
              ("Gargle with warm salt water and suck on a lozenge.",
               "Drink warm liquids, rest your voice and eat soft food."),
              "acute pharyngitis; the Centor score decides on strep testing",
              "start penicillin V 500 mg four times daily if the score is 3 or more",
              "see an ENT surgeon at once if you cannot open your mouth"),
        Topic(("I get heartburn almost every evening after dinner. How can I stop it?",
               "heartburn every evening",
               "After dinner I often feel a burning behind my breastbone, especially lying down."),
              ("Eat smaller meals and don't lie down right after eating.",
               "Skip spicy food late at night and raise the head of your bed."),
              "gastro-oesophageal reflux disease, with peptic ulcer to rule out",
              "take omeprazole 20 mg before breakfast for 4 weeks",
              "see a gastroenterologist if you lose weight or struggle to swallow"),
        Topic(("I can't fall asleep at night, sometimes for hours. What can I do?",
               "can't sleep insomnia tips",
               "I lie awake until 3 am most nights and then I'm exhausted at work."),
              ("Go to bed at the same time and skip coffee after lunch.",
               "Keep your room dark and put your phone away an hour before bed."),
              "chronic insomnia, possibly with low mood or sleep apnoea behind it",
              "use melatonin 2 mg an hour before bed with a strict wake time",
              "see a sleep specialist if your partner notices loud snoring"),
        Topic(("I twisted my ankle playing football and it's swollen. What now?",
               "twisted ankle swollen",
               "I went over on my ankle on a kerb yesterday and it's puffy and bruised."),
              ("Rest it, put ice on it and keep your foot up.",
               "Wrap it gently, stay off it and use a cold pack."),
              "a lateral ligament sprain; the Ottawa rules decide on an X-ray",
              "take ibuprofen 400 mg three times daily and start moving it after 48 hours",
              "see an orthopaedic surgeon if you cannot bear weight"),
        Topic(("My blood pressure reading at the pharmacy was 150 over 95. Should I worry?",
               "blood pressure 150/95",
               "A machine at the supermarket said my blood pressure is 150 over 95, and I feel fine."),
              ("Cut down on salt, walk every day and try to relax.",
               "Eat more vegetables, drink less alcohol and keep active."),
              "stage 2 hypertension if home readings confirm it",
              "check home readings twice daily for 7 days; amlodipine 5 mg is the usual start",
              "see a cardiologist promptly if you have chest pain"),
        Topic(("I have an itchy red rash on my arms. What could it be?",
               "itchy red rash on arms",
               "A red, itchy patch appeared on both forearms after I started a new washing powder."),
              ("Wash with mild soap and use a gentle unscented cream.",
               "Try not to scratch and wear loose cotton sleeves."),
              "contact dermatitis, with eczema and a drug eruption as alternatives",
              "apply hydrocortisone 1 percent cream twice daily for 7 days",
              "see a dermatologist if it blisters or spreads"),
        Topic(("My eyes are red and gritty in the morning. How do I treat that?",
               "red gritty eyes morning",
               "Both my eyes feel sandy when I wake up and the edges of my lids look red."),
              ("Rest your eyes from screens and use a warm cloth on them.",
               "Keep your hands away from your eyes and wash your face gently."),
              "blepharitis, or dry eye disease from meibomian gland dysfunction",
              "use warm compresses for 10 minutes and lid hygiene twice daily",
              "see an ophthalmologist if your vision blurs or the eye hurts"),
        Topic(("I feel dizzy when I stand up quickly. Is that normal?",
               "dizzy when standing up",
               "Every time I get up from the sofa the room spins for a few seconds."),
              ("Stand up slowly and drink enough water during the day.",
               "Sit for a moment before you get up and eat regular meals."),
              "orthostatic hypotension, with medication effects to review",
              "measure lying and standing blood pressure and raise fluids to 2 litres",
              "see a cardiologist if you faint or have palpitations"),
    ),
    "legal": (
        Topic(("My landlord won't give back my deposit. What can I do?",
               "landlord keeping deposit",
               "I moved out a month ago, left the flat clean, and the landlord still hasn't returned my deposit."),
              ("Ask the landlord politely in writing and keep your receipts.",
               "Send a friendly message with photos of the flat."),
              "a breach of the tenancy deposit protection rules",
              "send a letter before action giving 14 days to repay",
              "see a housing solicitor if the deposit was never protected"),
        Topic(("I got a parking ticket but the sign was hidden. Do I have to pay?",
               "parking fine hidden sign",
               "I parked on a street where the restriction sign was behind a tree, and now I have a fine."),
              ("Take photos of the sign and ask them to cancel it.",
               "Check where you parked and pay early if it seems fair."),
              "a penalty charge that fails for inadequate signage",
              "lodge a formal challenge within 28 days with dated photographs",
              "see a traffic lawyer if it goes to the tribunal"),
        Topic(("I was fired without any warning. Is that allowed?",
               "fired without warning",
               "After four years in the job my manager told me on Friday not to come back, no reason given."),
              ("Stay calm, ask for the reason and write down what happened.",
               "Ask your employer for a letter explaining the decision."),
              "unfair dismissal after more than 2 years of service",
              "start early conciliation within 3 months less one day",
              "see an employment solicitor before signing any settlement"),
        Topic(("My neighbour's dog barks all night. How do I make it stop?",
               "neighbour dog barking all night",
               "The dog next door has barked every night this month, and talking to them didn't help."),
              ("Talk to your neighbour kindly and suggest quiet hours.",
               "Try a friendly note and see if you can agree on something."),
              "a statutory noise nuisance",
              "keep a 14 day noise diary and report it to the council",
              "see a property litigator if the council will not act"),
        Topic(("My new phone broke after a week. Can I get my money back?",
               "new phone broken refund",
               "The phone I bought ten days ago stopped charging, and the shop says it's my fault."),
              ("Take it back to the shop with the receipt and ask for a swap.",
               "Keep the box and receipt and ask the shop for a repair."),
              "goods of unsatisfactory quality under consumer law",
              "reject the goods within 30 days in writing for a full refund",
              "see a consumer rights lawyer if the shop still refuses"),
        Topic(("How do I make a will that my family can't argue about?",
               "making a will",
               "I'm getting older and want to make sure my house goes to my daughter without a fight."),
              ("Write down who should get what and tell your family.",
               "Keep your wishes in writing somewhere safe."),
              "testamentary planning with a risk of an undue influence claim",
              "sign the will before 2 independent witnesses and record your capacity",
              "see a probate solicitor to draft it properly"),
        Topic(("I signed a gym contract too fast. Can I cancel it?",
               "cancel contract just signed",
               "A salesperson pushed me into a two-year contract yesterday and I regret it already."),
              ("Read it again slowly and ask the company if you can cancel.",
               "Contact them quickly and explain you changed your mind."),
              "a consumer contract within the 14 day cooling off period",
              "send written notice of cancellation within 14 days by recorded post",
              "see a contract lawyer if they refuse to cancel"),
        Topic(("Someone drove into my car at a red light. What should I do?",
               "car accident not my fault",
               "A van hit the back of my car while I was waiting at the lights, and my neck hurts."),
              ("Swap details with the other driver and take photos.",
               "Write down what happened while you still remember it."),
              "a negligence claim against the other driver's insurer",
              "notify your insurer within 7 days and claim within 3 years",
              "see a personal injury solicitor about the neck injury"),
        Topic(("A client hasn't paid my invoice for three months. What are my options?",
               "client not paying invoice",
               "I did a website for a company in spring, and they keep promising to pay but never do."),
              ("Send the client a friendly reminder and keep a record.",
               "Call them and agree a date for the payment."),
              "an unpaid commercial debt with statutory late payment interest",
              "issue a letter before claim adding 8 percent interest",
              "see a debt recovery lawyer if it goes to court"),
        Topic(("My neighbour moved the fence onto my land. What can I do?",
               "neighbour moved fence boundary",
               "When my neighbour replaced the fence, it ended up half a metre into my garden."),
              ("Talk to your neighbour and look at where the old fence was.",
               "Take photos and try to agree on the line together."),
              "a boundary dispute under the general boundaries rule",
              "obtain the registered title plan and a surveyor's report",
              "see a property solicitor before moving the fence yourself"),
        Topic(("My employer hasn't paid my overtime. Can I claim it?",
               "unpaid overtime claim",
               "For six months I've worked late every week, and the overtime never shows up on my payslip."),
              ("Keep your own record of the hours and ask payroll about it.",
               "Raise it calmly with your manager and keep your payslips."),
              "an unlawful deduction from wages",
              "raise a written grievance and claim within 3 months of the last shortfall",
              "see an employment solicitor about a tribunal claim"),
        Topic(("A company is using my photo on their website without asking. Is that legal?",
               "company using my photo without permission",
               "I found a picture I took on holiday on a travel company's site, with no credit or payment."),
              ("Email them and ask them to take it down.",
               "Keep screenshots and ask them politely to remove it."),
              "copyright infringement of your photograph",
              "send a takedown notice and an invoice for a licence fee",
              "see an intellectual property lawyer if they ignore it"),
    ),
    "financial": (
        Topic(("I have 5,000 on my credit card. How do I pay it off?",
               "pay off credit card debt",
               "My credit card balance keeps growing even though I pay the minimum every month."),
              ("Pay a bit more than the minimum and cut small costs.",
               "Stop using the card and pay something extra each month."),
              "revolving debt at about 24 percent APR, best tackled by the avalanche method",
              "move the balance to a 0 percent card and repay 250 a month",
              "talk to a certified debt counsellor if you miss payments"),
        Topic(("I'm 35 and have no pension. How should I start saving for retirement?",
               "start saving for retirement at 35",
               "I've never paid into a pension and I'm worried I've left it too late."),
              ("Put a little money aside every month and leave it alone.",
               "Start small now, even a little each month helps."),
              "a retirement gap best closed with the employer match and tax relief",
              "contribute 12 percent of salary to the workplace pension",
              "see a chartered pension adviser about the allowances"),
        Topic(("How much money should I keep for emergencies?",
               "emergency fund how much",
               "My car broke down last month and I had nothing saved, so I want a safety net."),
              ("Keep some cash in a separate account for bad days.",
               "Save a little each week until you have a cushion."),
              "an emergency reserve sized to fixed costs and income stability",
              "hold 6 months of expenses in an instant access account",
              "see a certified financial planner to size it"),
        Topic(("I want to buy my first flat. How do I get a mortgage?",
               "first mortgage first home",
               "My partner and I rent and would like to buy a small flat in the next two years."),
              ("Save for a deposit and look at homes you can afford.",
               "Work out what you can pay each month before you look."),
              "a first mortgage governed by the loan to value ratio and affordability tests",
              "save a 10 percent deposit and fix the rate for 5 years",
              "see an independent mortgage broker before you make an offer"),
        Topic(("I inherited 20,000. What should I do with it?",
               "invest an inheritance",
               "My grandmother left me some money, and I don't want to waste it."),
              ("Don't rush, keep it safe in the bank while you think.",
               "Put it somewhere safe and take your time to decide."),
              "a lump sum decision about asset allocation, fees and tax wrappers",
              "invest 80 percent in a global index fund inside an ISA",
              "see a fee-only investment adviser about the allocation"),
        Topic(("Should I pay off my student loan early?",
               "student loan repay early",
               "I have a big student loan and I'm not sure whether to pay extra each month."),
              ("Pay what you can and remember payments follow your income.",
               "Don't stress about it, it comes out of your salary."),
              "an income contingent loan with a repayment threshold and write-off date",
              "repay 9 percent above the threshold and do not overpay",
              "see a student finance adviser if your income jumps"),
        Topic(("My shares have dropped 20 percent. Should I sell?",
               "shares dropped should I sell",
               "Everything in my investment account is down since spring, and I keep checking it."),
              ("Stay calm, don't sell in a panic and think long term.",
               "Try not to look every day and give it time."),
              "a drawdown within normal equity volatility",
              "rebalance to a 60 40 portfolio once a year",
              "see a chartered wealth manager to review your horizon"),
        Topic(("I never know where my money goes each month. How do I budget?",
               "how to make a monthly budget",
               "By the end of every month my account is empty and I can't say what I spent it on."),
              ("Write down what you spend and look for things to cut.",
               "Keep your receipts for a month and see where it goes."),
              "a household cash flow problem of fixed versus variable costs",
              "apply the 50 30 20 rule to your net income",
              "see a money coach to set up the categories"),
        Topic(("I got a tax bill I didn't expect. How do I deal with it?",
               "unexpected tax bill",
               "A letter from the tax office says I owe 2,000 from last year and I don't understand why."),
              ("Open the letter, check the numbers and ask for more time.",
               "Don't ignore it, call them and ask what it's for."),
              "an unexpected liability to check against the assessment basis",
              "request a time to pay arrangement within 30 days",
              "see a chartered tax adviser to check the calculation"),
        Topic(("Which savings account should I choose?",
               "best savings account",
               "I have a few thousand in my current account earning nothing, and I want to move it."),
              ("Compare a few banks and pick one with a good rate.",
               "Look for an account that's easy to use and pays a bit."),
              "a choice between fixed term and easy access deposit accounts",
              "fix 50 percent for 1 year at the best rate and keep the rest instant access",
              "see an independent financial adviser for larger sums"),
        Topic(("Is it a good idea to lease a car instead of buying one?",
               "lease or buy a car",
               "My old car is dying, and the dealer keeps offering me a lease deal."),
              ("Think about how long you keep a car and what you can afford.",
               "Compare the monthly cost with what buying would cost."),
              "a lease versus loan comparison on total cost of ownership",
              "compare the total payments plus the balloon against a 4 year loan",
              "see an independent financial adviser before signing"),
        Topic(("I want to start investing with 100 a month. Where do I begin?",
               "start investing 100 a month",
               "I finally have a little spare money each month and want it to grow."),
              ("Start with something simple and keep adding a little.",
               "Pick a low cost option and be patient."),
              "regular investing with pound cost averaging",
              "set up a 100 monthly direct debit into a global index fund in an ISA",
              "see a fee-only adviser if your goals change"),
    ),
}  # fmt: skip


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def responses(domain: str, topic: Topic, rng: random.Random, frame: int) -> dict[str, str]:
    """One response per level for ``topic``, drawn from its level's sentence pools (expert: frame ``frame``)."""
    who = rng.choice(PROFESSIONAL[domain])
    avoid = " ".join(
        [
            rng.choice(AVOID_OPEN).format(kind=KIND[domain]),
            rng.choice(AVOID_REASON),
            rng.choice(AVOID_REFER).format(who=who, Who=_cap(who)),
        ]
    )
    generic = " ".join([rng.choice(GENERIC_OPEN), rng.choice(topic.plain), rng.choice(GENERIC_CLOSE[domain])])
    expert = EXPERT_FRAMES[frame].format(
        assessment=topic.assessment, action=topic.action, Action=_cap(topic.action), referral=topic.referral
    )
    return {"avoidance": avoid, "generic": generic, "expert": expert}


def _questions(topic: Topic, rng: random.Random) -> list[str]:
    """QUESTIONS_PER_TOPIC distinct questions: the three phrasings, some with a personal context first."""
    forms = [(q, c) for q in topic.questions for c in (None, *CONTEXTS)]
    plain = [(q, None) for q in topic.questions]
    extra = rng.sample([f for f in forms if f[1] is not None], QUESTIONS_PER_TOPIC - len(plain))
    picked = plain + extra
    rng.shuffle(picked)
    return [q if c is None else f"{c} {_cap(q)}" for q, c in picked]


def dataset(seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train, held_out): per domain, 2 whole topics held out and one question of every other topic."""
    rng = random.Random(seed)
    train: list[Item] = []
    held: list[Item] = []
    for domain in DOMAINS:
        topics = TOPICS[domain]
        out_topics = set(rng.sample(range(len(topics)), HELD_OUT_TOPICS))
        for index, topic in enumerate(topics):
            questions = _questions(topic, rng)
            frames = rng.sample(range(len(EXPERT_FRAMES)), QUESTIONS_PER_TOPIC)  # no expert answer twice
            seen: set[str] = set()
            for k, question in enumerate(questions):
                answers = responses(domain, topic, rng, frames[k])
                while answers["avoidance"] in seen or answers["generic"] in seen:
                    answers = responses(domain, topic, rng, frames[k])
                seen.update((answers["avoidance"], answers["generic"]))
                item = Item(domain, index, question, **answers)
                (held if index in out_topics or k == 0 else train).append(item)
    return train, held
