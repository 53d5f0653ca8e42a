"""Write the fine-tuning demo's datasets: free-text shipping requests -> a fixed-key "order record".

The record format is a house format nobody could guess (terse keys, "Last, First" names, upper-case
hyphenated SKUs, three-letter weekdays, null when no day is given), so base models score ~0 on it and a
small LoRA run can learn it from 100 examples. The generator is seeded, so the committed jsonl files are
reproducible byte for byte; some names and cities appear only in the held-out set, so a model must learn
the rule rather than memorise the training examples.

    python data/make_finetune_data.py                # rewrites data/finetune_train.jsonl and finetune_heldout.jsonl
    python data/make_finetune_data.py --check        # exits 1 if the committed files differ from a fresh generation
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))  # common.py: the one parser shape every script has
FIRST_NAMES = ["Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Liam", "Yuki", "Noah", "Sofia", "Ravi",
               "Emma", "Kwame", "Lucia", "Omar", "Hannah", "Diego", "Ingrid", "Tariq", "Grace", "Mateo", "Nadia",
               "Victor", "Elena", "Samuel", "Mei", "Jonas", "Zara", "Felix", "Priya", "Hugo"]
LAST_NAMES = ["Lopez", "Smith", "Okafor", "Nakamura", "Petrov", "Silva", "Haddad", "Murphy", "Tanaka", "Fischer",
              "Rossi", "Patel", "Novak", "Mensah", "Garcia", "Khan", "Berg", "Moreau", "Costa", "Kowalski",
              "Ahmed", "Larsen", "Wong", "Brown", "Schmidt", "Dubois", "Ortiz", "Nguyen", "Walsh", "Ibrahim"]
CITIES = ["Denver", "Lyon", "Osaka", "Porto", "Nairobi", "Leeds", "Austin", "Gdansk", "Cork", "Perth", "Quito",
          "Bergen", "San Diego", "New Orleans", "Tampa", "Graz", "Hamburg", "Seville", "Dakar", "Malmo", "Boise",
          "Tucson", "Utrecht", "Halifax", "Turin", "Adelaide", "Salt Lake City", "Brno"]
# (singular, plural, SKU): the SKU is the house code, upper case with hyphens.
ITEMS = [("pen", "pens", "PEN"), ("stapler", "staplers", "STAPLER"), ("notebook", "notebooks", "NOTEBOOK"),
         ("marker", "markers", "MARKER"), ("envelope", "envelopes", "ENVELOPE"),
         ("battery", "batteries", "BATTERY"), ("folder", "folders", "FOLDER"), ("chair", "chairs", "CHAIR"),
         ("desk lamp", "desk lamps", "DESK-LAMP"), ("paper clip", "paper clips", "PAPER-CLIP"),
         ("ink cartridge", "ink cartridges", "INK-CARTRIDGE"), ("box", "boxes", "BOX"), ("mouse", "mice", "MOUSE"),
         ("keyboard", "keyboards", "KEYBOARD"), ("monitor", "monitors", "MONITOR"), ("cable", "cables", "CABLE"),
         ("whiteboard", "whiteboards", "WHITEBOARD"), ("calculator", "calculators", "CALCULATOR"),
         ("USB stick", "USB sticks", "USB-STICK"), ("coffee mug", "coffee mugs", "COFFEE-MUG")]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
HELDOUT_ONLY_FRACTION = 0.25  # this share of names and cities never appears in training
# {name} = "First Last"; {q} {item} agree in number; {day} is a phrase like "Friday" / "this Friday" / "Fri";
# {on_day} is "on Friday" but plain "next Friday".
TEMPLATES_WITH_DAY = [
    "{name} needs {q} {item} shipped to {city} by {day}.",
    "Please send {q} {item} to {city} for {name}, {day}.",
    "Order from {name}: {q} {item}, deliver to {city} {on_day}.",
    "Can you get {q} {item} to {name} in {city} before {day}?",
    "{Day} delivery for {name} in {city}: {q} {item}.",
    "Hi, this is {name}. I'd like {q} {item} sent to our {city} office by {day}.",
    "Ship {q} {item} to {city}. Customer: {last}, {first}. Due {day}.",
    "{name} from {city} ordered {q} {item} and needs them {on_day}.",
]
TEMPLATES_NO_DAY = [
    "{name} wants {q} {item} sent to {city}, no rush.",
    "Put {q} {item} on the next truck to {city} for {name}.",
    "Customer {name} ({city}) asked for {q} {item}; any day is fine.",
]
NO_DAY_FRACTION = 0.2


def quantity_phrase(rng: random.Random) -> tuple[int, str]:
    """A quantity and how the sentence says it: digits, a number word, or an idiom."""
    style = rng.random()
    if style < 0.45:
        n = rng.randint(2, 60)
        return n, str(n)
    if style < 0.8:
        n = rng.randint(1, 12)
        return n, NUMBER_WORDS[n - 1] if n > 1 or rng.random() < 0.5 else "a"
    return rng.choice([(12, "a dozen"), (6, "half a dozen"), (2, "a pair of"), (24, "two dozen")])


def day_phrase(rng: random.Random, day: str) -> str:
    return rng.choice([day, day, f"this {day}", f"next {day}", day[:3], day.lower()])


def make_example(rng: random.Random, firsts: list[str], lasts: list[str], cities: list[str]) -> dict:
    first, last, city = rng.choice(firsts), rng.choice(lasts), rng.choice(cities)
    singular, plural, sku = rng.choice(ITEMS)
    n, q = quantity_phrase(rng)
    has_day = rng.random() >= NO_DAY_FRACTION
    day = rng.choice(WEEKDAYS)
    template = rng.choice(TEMPLATES_WITH_DAY if has_day else TEMPLATES_NO_DAY)
    phrase = day_phrase(rng, day)
    if template.startswith("{Day}"):
        phrase = phrase[0].upper() + phrase[1:]
    on_day = phrase if phrase.startswith(("this", "next")) else f"on {phrase}"
    text = template.format(name=f"{first} {last}", first=first, last=last, city=city,
                           q=q, item=singular if n == 1 else plural, day=phrase, Day=phrase, on_day=on_day)
    record = {"cust": f"{last}, {first}", "n": n, "sku": sku, "to": city,
              "due": day[:3].upper() if has_day else None}
    return {"text": text, "record": record}


def generate(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pools = {}
    for key, names in (("first", FIRST_NAMES), ("last", LAST_NAMES), ("city", CITIES)):
        shuffled = names[:]
        rng.shuffle(shuffled)
        cut = int(len(shuffled) * HELDOUT_ONLY_FRACTION)
        pools[key] = (shuffled[cut:], shuffled)  # (train pool, held-out pool = everything)
    seen, train, heldout = set(), [], []
    while len(train) < n_train:
        example = make_example(rng, pools["first"][0], pools["last"][0], pools["city"][0])
        if example["text"] not in seen:
            seen.add(example["text"])
            train.append({"id": f"train-{len(train):03d}", **example})
    while len(heldout) < n_heldout:
        example = make_example(rng, pools["first"][1], pools["last"][1], pools["city"][1])
        if example["text"] not in seen:
            seen.add(example["text"])
            heldout.append({"id": f"heldout-{len(heldout):03d}", **example})
    return train, heldout


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def parse_args(argv=None):
    import common
    parser = common.argument_parser(__doc__)
    common.add_common_flags(parser, "--seed", defaults={"--seed": 20240611})  # the committed files' seed
    parser.add_argument("--n-train", type=common.positive_int, default=100, help="training examples")
    parser.add_argument("--n-heldout", type=common.positive_int, default=50, help="held-out examples")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="folder for the two .jsonl files")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    train, heldout = generate(args.seed, args.n_train, args.n_heldout)
    files = {args.out_dir / "finetune_train.jsonl": to_jsonl(train),
             args.out_dir / "finetune_heldout.jsonl": to_jsonl(heldout)}
    for path, text in files.items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                print(f"{path} differs from a fresh generation (seed {args.seed}).", file=sys.stderr)
                return 1
        else:
            path.write_text(text)
            print(f"wrote {path} ({text.count(chr(10))} examples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
