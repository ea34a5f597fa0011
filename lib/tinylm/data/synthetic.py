"""A built-in children's-story generator: the offline demo's data and every test's.

Stories are drawn from plot templates (lost toy, new friend, sharing, fear, building, trip, helping,
race, rain, magic) filled with names, places, objects and quoted speech. Each story is several
paragraphs; about a third of them put a blank line between paragraphs, as some real stories do.
The stream is deterministic by seed, and `generate_stories(n, seed)` is a prefix of
`iter_stories(seed)`. It is made of chunks of CHUNK stories, each drawn from its own random stream
(seeded by the stream's seed and the chunk's index), so that worker processes can write the chunks
of a large corpus side by side and still give the same stories as one process. Averaging about 800
bytes a story, one process writes 6,000 to 20,000 stories a second.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator

from .workers import n_workers, parallel_map

# (name, subject, object, possessive pronoun)
_HEROES = [
    (n, "she", "her", "her")
    for n in "Lily Mia Sue Anna Emma Lucy Zoe Amy Kim Rose Ella Sara Jane Molly Daisy Ruby Nora Lola Ivy Maya".split()
] + [
    (n, "he", "him", "his")
    for n in "Tom Ben Max Sam Tim Leo Jack Joe Jake Finn Bob Ned Timmy Billy Spot Rex Milo Toby Oscar Leo".split()
]
# Made-up names (two or three syllables) give the vocabulary a long tail, as real names do.
_NAME_HEADS = (
    "Ba Be Bo Bu Da De Di Do Fa Fe Fi Fo Ga Gi Go Ha He Hu Ja Je Jo Ka Ki Ko La Le Li Lo Lu Ma Me Mi "
    "Mo Na Ne Ni No Pa Pe Pi Po Ra Re Ri Ro Ru Sa Se Si So Ta Te Ti To Va Vi Wa Wi Ya Yo Za Zi Zo"
).split()
_NAME_MIDS = ["", "", "", "ri", "la", "mo", "ne", "bi", "lo", "ta", "ven", "del", "mar", "ro"]
_NAME_TAILS = "bby ddy lly nny ra na la lo mo ko x n m sh th ria lia ndo lton ssa tte rk belle ka nda by".split()
_TOWN_HEADS = "Green Sun Maple Oak River Pine Apple Honey Star Moon Cloud Berry Willow Rose Stone Bright".split()
_TOWN_TAILS = "field wood brook ville ton dale hill port shire meadow bridge creek".split()
_KINDS = (
    "girl boy bunny kitten puppy bear duck mouse frog bird fox squirrel owl turtle pig cow horse "
    "lamb goat hen deer raccoon hedgehog elephant lion monkey penguin dragon robot"
).split()
_TRAITS = (
    "happy kind brave curious shy silly little clever gentle playful friendly busy sleepy hungry "
    "tiny cheerful careful lazy proud grumpy funny polite quiet loud bouncy fluffy"
).split()
_ADVERBS = "quickly slowly happily carefully quietly softly gently loudly proudly bravely".split()
_PLACES = [
    "the park", "the forest", "the beach", "the garden", "the farm", "a small town", "the big city",
    "a little house", "the village", "the meadow", "the hill", "the zoo", "the lake", "the river",
    "the school", "the jungle", "the playground", "the woods", "the backyard", "the market",
]  # fmt: skip
_SPOTS = [
    "under the bed", "behind the big tree", "near the pond", "in the tall grass", "under a rock",
    "in the toy box", "next to the door", "behind the couch", "in the sand", "on the old bench",
]  # fmt: skip
_COLORS = "red blue green yellow shiny soft tiny big old pink purple orange".split()
_THINGS = (
    "ball kite boat car hat balloon stone spoon drum book bear doll train box shell key crayon cup "
    "blanket flower bell whistle robot puzzle scarf shoe sock leaf feather button ribbon wagon bucket "
    "shovel basket lamp clock map mirror pillow rope sticker marble jar brush bike truck"
).split()
_FOODS = (
    "apple cookie cake sandwich banana pie muffin orange candy carrot pear grape cupcake pancake "
    "cherry lemon peach bun pizza strawberry"
).split()
_ACTIVITIES = [
    "play outside", "draw pictures", "sing songs", "read books", "run fast", "build towers",
    "dance in the sun", "swim in the water", "climb trees", "look at the stars", "jump in puddles",
    "pick flowers", "play with blocks", "ride a bike", "bake with Mom", "chase butterflies",
]  # fmt: skip
_GROWNUPS = ["Mom", "Dad", "Grandma", "Grandpa", "the teacher", "Aunt May"]
_HELPERS = [
    ("a little bird", "the bird", "its wing hurt"),
    ("an old man", "the old man", "his bag was too heavy"),
    ("a small cat", "the cat", "it was stuck up a tree"),
    ("a baby duck", "the duck", "it could not find its mom"),
    ("a sad girl", "the girl", "she had lost her way"),
    ("a tiny ant", "the ant", "a leaf fell on it"),
]  # fmt: skip
_FEARS = [
    ("the dark", "It is only the night. The stars are there to keep you company."),
    ("the loud thunder", "Thunder is just noise from the sky. It cannot hurt you."),
    ("the big dog next door", "He wags his tail because he wants to be your friend."),
    ("the deep water", "I will hold your hand. We will go slow."),
    ("the tall slide", "You can do it. I will wait for you at the bottom."),
]  # fmt: skip
_WOW = ["Wow", "Look", "Oh", "Yay", "Hooray", "Oh my"]
_OHNO = ["Oh no", "Oh dear", "Uh oh", "Oh, no"]
_MORALS = [
    "sharing makes everyone happy", "friends help each other", "it is good to be brave",
    "you should never give up", "being kind is the best thing", "it is good to say sorry",
    "you should listen to your mom and dad", "little things can bring big joy",
]  # fmt: skip

# A slot is a tuple of alternative templates, one picked per story. A slot whose first entry is a
# float is optional: it appears with that probability.
_OPENINGS = [
    ("Once upon a time, there was a {trait} {kind} named {name}.",
     "Once upon a time, in {place}, lived a {trait} {kind} called {name}.",
     "One day, a {trait} {kind} named {name} woke up early.",
     "There once was a {kind} named {name} who lived near {place}."),
    ("{He} loved to {activity} every day.",
     "{Name} liked to {activity} with {his} friend {friend}.",
     "Every morning, {name} would {activity} and smile.",
     "{His} favorite thing was to {activity}."),
    (0.3, "{Name} was {n} years old.", "{Name} had {n} friends who lived on the same street."),
    (0.7, "{He} had a {color} {thing} that {he} loved very much.",
     "{Name} lived with {grownup} in a little house with a {color} door.",
     "{He} was {trait}, and everyone in {place} knew {him}."),
    (0.6, "The sun was warm and the sky was blue.", "It was a cold morning, and the wind was blowing.",
     "The birds were singing in the trees.", "It was spring, and the flowers were starting to grow.",
     "{Name} always said, \"Today will be a good day!\""),
]  # fmt: skip
_LINKS = [
    ("The next day, {name} had another adventure.", "Later that week, something else happened.",
     "But the day was not over yet.", "After lunch, {name} went out again."),
]  # fmt: skip
_PLOTS = {
    "lost": [
        [("One day, {name} went to {place} with {his} {color} {thing}.",
          "One sunny day, {name} took {his} {color} {thing} to {place}."),
         ("{He} played and played until the sun was low.", "{He} had so much fun that {he} forgot about it.",
          "{He} ran {adverb} from one tree to the next, {n} times in a row."),
         ("When it was time to go home, the {thing} was gone!", "Then {name} looked down. The {thing} was not there!")],
        [('"{ohno}!" cried {name}. "Where is my {thing}?"', '{Name} felt {feeling2}. "I lost my {thing}," {he} said.'),
         ("{Friend} came running. \"Don't worry, {name}. I will help you look.\"",
          '{Friend} saw {him} and asked, "Why are you sad?"'),
         ("They looked everywhere. At last, {friend} found it {spot}.",
          "They looked high and low, and there it was, {spot}!"),
         ('"{wow}, thank you!" said {name}, and {he} gave {friend} a big hug.',
          '{Name} smiled. "You are a good friend," {he} said.')],
    ],
    "friend": [
        [("One day at {place}, {name} saw a {kind2} sitting alone.", "At {place}, {name} met a {kind2} named {friend}."),
         ("The {kind2} looked {feeling2}.", "{Friend} did not have anyone to play with."),
         ('"Hello," said {name}. "Do you want to play with me?"', '"Can I play with you?" asked {name}.')],
        [('"Yes, please!" said {friend}.', '{Friend} smiled a big smile. "I would like that," {friend} said.'),
         ("They played with {his} {color} {thing} and ran in the grass.",
          "They liked to {activity} together all afternoon."),
         (0.6, "When the sun went down, {friend} said, \"Can we play again tomorrow?\"",
          '"You are my best friend," said {friend}.')],
    ],
    "share": [
        [("{Name} had a big {food} for lunch.", "{Grownup} gave {name} a yummy {food}."),
         ("{Friend} looked at the {food} and said, \"That looks so good. Can I have some?\"",
          '{Friend} was hungry. "I have no {food}," {friend} said.'),
         ('At first, {name} said, "No, it is mine!"', "{Name} wanted to keep it all.")],
        [("But then {he} saw that {friend} was {feeling2}.", "Then {he} thought about how {friend} felt."),
         ('"Here, we can share," said {name}. {He} broke the {food} in two.',
          '{Name} gave {friend} half. "Sharing is nice," {he} said.'),
         ("The {food} tasted even better when they ate it together.", "They both smiled and ate every bite.")],
    ],
    "fear": [
        [("{Name} was scared of {fear}.", "There was one thing {name} did not like: {fear}."),
         ('"I don\'t want to go," {he} said to {grownup}.', '{He} hid {spot} and said, "I am too scared."'),
         ('{Grownup} hugged {him}. "{comfort}"', '{Grownup} smiled and said, "{comfort}"')],
        [("{Name} took a deep breath.", "{Name} thought about it for a long time."),
         ('"Okay, I will try," {he} said.', '"I can be brave," {he} said softly.'),
         ("And it was not so bad after all!", "Soon {he} was laughing. It was fun!"),
         (0.5, "{Name} was very {feeling} that {he} tried.", "{Grownup} was proud of {him}.")],
    ],
    "build": [
        [("{Name} and {friend} wanted to build a big {build} at {place}.",
          "One day, {name} and {friend} decided to make a {build}."),
         ("They worked very hard.", "They used sticks, stones and lots of sand."),
         ("But then a big wind came, and the {build} fell down!", "Just when it was done, the {build} fell over.")],
        [('"{ohno}!" said {friend}. "Our {build} is broken."', '{Friend} was sad. "We have to start again," {friend} said.'),
         ('"Let\'s try again," said {name}. "We can make it even better."',
          '{Name} said, "It is okay. We can fix it together."'),
         ("This time they made it strong, and it did not fall.", "The new {build} was the best one ever."),
         ('"{wow}!" they said together.', "They laughed and clapped their hands.")],
    ],
    "trip": [
        [("One morning, {grownup} said, \"Today we will go to {place2}!\"",
          "{Name} and {grownup} went on a trip to {place2}."),
         ("{Name} was so {feeling} that {he} jumped up and down.", "{He} packed {his} {color} {thing} and a {food}."),
         ("At {place2}, they saw many things.", "When they got there, {name} saw birds, trees and a big {color} {thing2}.")],
        [('"{wow}, look at that!" said {name}.', '"What is that?" asked {name}, pointing far away.'),
         ("It was a {trait} {kind2} who wanted to say hello.", "It was a {color} {thing2}, as big as a house!"),
         ("{Name} waved, and it waved back.", "{Name} laughed and {grownup} laughed too."),
         (0.6, "It was the best day of {his} life.", '"Can we come back tomorrow?" {he} asked.')],
    ],
    "help": [
        [("One day at {place}, {name} saw {helper}.", "While {he} was walking to {place}, {name} found {helper}."),
         ("{Helper_the} was {feeling2} because {trouble}.", "{name_cap_trouble}"),
         ('"I will help you," said {name}.', '"Do not worry," {name} said. "I am here."')],
        [("{Name} was careful and gentle.", "{He} called {friend} and {grownup} to help too.",
          "{Name} moved {adverb} so {he} would not make it worse."),
         ("Soon everything was all right.", "Together they made everything better."),
         ('"Thank you, thank you!" said {helper_the}.', "{Helper_the} was very happy and said thank you."),
         ("{Name} felt warm inside.", "Helping made {name} feel {feeling}.")],
    ],
    "race": [
        [("{Name} and {friend} wanted to have a race at {place}.", '"Let\'s race to the big tree!" said {friend}.'),
         ('"Ready, set, go!" shouted {name}.', "They counted to {n} and ran as fast as they could."),
         ("Then {friend} tripped on a {thing} and fell down.", "Halfway there, {friend} fell and hurt a knee.")],
        [("{Name} stopped running.", "{Name} did not want to win alone."),
         ('"Are you okay?" {he} asked, and helped {friend} up.', '{He} went back and said, "Take my hand."'),
         ("They walked to the tree together.", "They finished the race side by side."),
         ('"We both won!" said {friend}, and they laughed.', "It did not matter who won. They were friends.")],
    ],
    "rain": [
        [("{Name} wanted to have a picnic at {place} with a {food}.", "It was a good day to go to {place}, or so {name} thought."),
         ("But then dark clouds came, and it began to rain.", "Suddenly, big drops of rain began to fall."),
         ('"{ohno}," said {name}. "Now we cannot go out."', "{Name} looked out of the window and felt {feeling2}.")],
        [('{Grownup} said, "We can have a picnic inside!"', "{Grownup} put a blanket on the floor."),
         ("They ate the {food} and told funny stories.", "They played with the {color} {thing} and sang songs."),
         ("When the rain stopped, there was a big rainbow in the sky.", "Later, the sun came out again."),
         ('"{wow}, a rainbow!" said {name}.', "{Name} smiled. Rainy days could be fun too.")],
    ],
    "magic": [
        [("One day, {name} found a {color} {thing} {spot}.", "{Name} was playing at {place} when {he} saw a {color} {thing} that glowed."),
         ('"Hello, {name}," said the {thing}. "I am magic."', "When {name} touched it, the {thing} began to talk!"),
         ('"I can give you one wish," it said.', '"Make a wish," the {thing} said in a tiny voice.')],
        [("{Name} thought and thought.", "{Name} wanted many things, but {he} thought of {friend}."),
         ('"I wish my friend {friend} could be happy," {he} said.', '"I wish for a {food} for everyone," said {name}.'),
         ("The {thing} sparkled, and the wish came true.", "There was a bright light, and everyone smiled."),
         (0.5, "From then on, {name} kept the {thing} in a safe place.", "{Name} never forgot that magic day.")],
    ],
}  # fmt: skip
_ENDINGS = [
    ("From that day on, {name} and {friend} were the best of friends.",
     "At the end of the day, {name} went home {feeling} and tired.",
     "That night, {name} fell asleep with a big smile.",
     "{Name} knew it was a day {he} would always remember.",
     "And they all lived happily ever after."),
    (0.5, "{Grownup} gave {name} a warm hug and a {food}.", "{Name} told {grownup} all about it.",
     '"What a day!" said {name}.'),
    (0.35, "The moral of the story is that {moral}.", "{Name} learned that {moral}."),
]  # fmt: skip
_BUILDS = "sandcastle tower fort snowman treehouse bridge".split()
_HAPPY = "happy proud glad excited".split()
_SAD = "sad worried lonely upset".split()


_ARTICLE = re.compile(r"\b([Aa]) \{(\w+)\}")


def _with_articles(slots: list) -> list:
    """Template "a {color}" -> "{a_color}", filled with "a red" or "an orange"."""
    return [
        tuple(_ARTICLE.sub(r"{\1_\2}", t) if isinstance(t, str) else t for t in slot)
        for slot in slots
    ]


_OPENINGS, _ENDINGS = _with_articles(_OPENINGS), _with_articles(_ENDINGS)
_PLOTS = {k: [_with_articles(p) for p in plot] for k, plot in _PLOTS.items()}
_LINKS = _with_articles(_LINKS)
_PLOT_LIST = list(_PLOTS.values())
_ARTICLE_KEYS = ("color", "trait", "kind", "kind2", "food", "thing", "thing2", "build")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(r: random.Random, slots: list, ctx: dict) -> str:
    out = []
    for slot in slots:
        if isinstance(slot[0], float):
            if r.random() >= slot[0]:
                continue
            slot = slot[1:]
        out.append(r.choice(slot).format_map(ctx))
    return " ".join(out)


def _made_up_name(r: random.Random) -> str:
    return r.choice(_NAME_HEADS) + r.choice(_NAME_MIDS) + r.choice(_NAME_TAILS)


def _story(r: random.Random) -> str:
    name, he, him, his = r.choice(_HEROES)
    if r.random() < 0.4:
        name = _made_up_name(r)
    friend = r.choice(_HEROES)[0] if r.random() < 0.6 else _made_up_name(r)
    while friend == name:
        friend = _made_up_name(r)
    grownup = r.choice(_GROWNUPS)
    fear, comfort = r.choice(_FEARS)
    helper, helper_the, trouble = r.choice(_HELPERS)
    place, place2 = r.sample(_PLACES, 2)
    if r.random() < 0.3:
        place = f"the town of {r.choice(_TOWN_HEADS)}{r.choice(_TOWN_TAILS)}"
    thing, thing2 = r.sample(_THINGS, 2)
    ctx = {
        "name": name, "Name": name, "he": he, "He": _cap(he), "him": him, "his": his, "His": _cap(his),
        "friend": friend, "Friend": friend, "grownup": grownup, "Grownup": _cap(grownup),
        "kind": r.choice(_KINDS), "kind2": r.choice(_KINDS), "trait": r.choice(_TRAITS),
        "place": place, "place2": place2, "spot": r.choice(_SPOTS), "color": r.choice(_COLORS),
        "thing": thing, "thing2": thing2, "food": r.choice(_FOODS), "activity": r.choice(_ACTIVITIES),
        "feeling": r.choice(_HAPPY), "feeling2": r.choice(_SAD), "wow": r.choice(_WOW),
        "ohno": r.choice(_OHNO), "fear": fear, "comfort": comfort, "helper": helper,
        "helper_the": helper_the, "Helper_the": _cap(helper_the), "trouble": trouble,
        "name_cap_trouble": f"{name} saw that {trouble}.", "build": r.choice(_BUILDS),
        "moral": r.choice(_MORALS), "adverb": r.choice(_ADVERBS), "n": r.randint(2, 12),
    }  # fmt: skip
    for k in _ARTICLE_KEYS:
        v = ctx[k]
        ctx["a_" + k] = ("an " if v[0] in "aeiou" else "a ") + v
        ctx["A_" + k] = ("An " if v[0] in "aeiou" else "A ") + v
    paragraphs = [_fill(r, _OPENINGS, ctx)]
    for episode in range(1 if r.random() < 0.25 else 2):
        plot = r.choice(_PLOT_LIST)
        if episode:
            plot = [[*_LINKS, *plot[0]], *plot[1:]]
        paragraphs += [_fill(r, p, ctx) for p in plot]
    paragraphs.append(_fill(r, _ENDINGS, ctx))
    return ("\n\n" if r.random() < 0.33 else "\n").join(paragraphs)


CHUNK = 4096  # stories per independently seeded chunk of a stream
_STORY_BYTES = 800  # about a story's length in bytes: what one costs to write, for sizing the work


def story_chunk(seed: int | str, index: int, n: int = CHUNK) -> list[str]:
    """The first `n` (at most CHUNK) stories of chunk `index` of stream `seed`."""
    if not 0 <= n <= CHUNK:
        raise ValueError(f"a chunk holds at most {CHUNK} stories, not {n}")
    # A string seed is hashed (SHA-512), the same in every process and Python version.
    r = random.Random(f"{seed}/{index}")
    return [_story(r) for _ in range(n)]


def iter_stories(seed: int | str) -> Iterator[str]:
    """An endless deterministic stream of stories."""
    for index in itertools.count():
        yield from story_chunk(seed, index)


def story_chunks(n: int, seed: int | str, *, workers: int = 1) -> Iterator[list[str]]:
    """The first `n` stories of `iter_stories(seed)`, chunk by chunk (the last one cut), written by
    `workers` processes (tinylm.data.workers.parallel_map; 1: this process)."""
    sizes = [min(CHUNK, n - start) for start in range(0, n, CHUNK)]
    yield from parallel_map(_chunk_of, [(seed, i, k) for i, k in enumerate(sizes)], workers=workers)


def workers_for(n: int) -> int:
    """Worker processes to write `n` stories (tinylm.data.workers.n_workers: 1 for small corpora)."""
    return n_workers(None, n * _STORY_BYTES)


def _chunk_of(item: tuple) -> list[str]:
    return story_chunk(*item)


def generate_stories(n: int, seed: int | str, *, workers: int = 1) -> list[str]:
    """The first `n` stories of `iter_stories(seed)`."""
    return list(itertools.chain.from_iterable(story_chunks(n, seed, workers=workers)))
