"""Caption -> scene graph: rules over a Universal Dependencies parse (Stanza's English models or any UD parser).

Pure functions over a stanza `Sentence` or `Document` (no model needed), so the rules are tested on CoNLL-U
fixtures read with Stanza's own reader. The design follows SceneGraphParser (what Structure-CLIP used), moved
from spaCy's labels to UD's, where a preposition is a `case` child of its noun and the copula is not the head.

Objects
  O1 every NOUN/PROPN that is not part of a name (compound, flat, fixed) nor the noun of a multi-word
     preposition ("front" in "in front of"); pronouns are not objects. Its name is its compound/flat words as
     written, then its lemma, lower-cased except proper nouns: "two tennis rackets" -> "tennis racket".
Attributes (the word as written, lower-cased; in text order)
  A1 amod, expanded over conj:             "a red and white bus"     -> bus [red, white]
  A2 predicative adjective (nsubj + cop):   "the car is red"          -> car [red]
  A3 numerals (nummod):                     "two dogs"                -> dog [two]
  An adjective that governs a prepositional phrase is a relation, not an attribute ("next to", "close to").
Relations (subject, predicate, object); a verb is named by its lemma plus its particles ("pick up")
  R1 verb with subject and object:          "a man rides a horse"             -> (man, ride, horse)
  R2 verb with subject and obl + case:      "a cat sits on a mat"             -> (cat, sit on, mat);
     existential "be" keeps the preposition: "there is a dog on the bed"      -> (dog, on, bed)
  R3 copula with case:                      "the cat is on the mat"           -> (cat, on, mat)
  R4 nmod + case:                           "a man with a helmet"             -> (man, with, helmet)
  R5 acl (the noun is the verb's subject):  "a woman playing the piano"       -> (woman, play, piano)
  R6 acl:relcl through a relative pronoun:  "a man who rides a horse"         -> (man, ride, horse);
     a relative object too:                 "a horse that a man rides"        -> (man, ride, horse)
  R7 passive, reversed to the active:       "a horse ridden by a man"         -> (man, ride, horse)
     (nsubj:pass or a passive acl, with obl:agent). A parser that labels agents `obl:agent` (Stanza's current
     English models) leaves a plain `obl` "by" locative: "a bike parked by a tree" -> (bike, park by, tree).
     For one that does not (UD English before EWT 2.13), a plain `obl` "by" of a passive verb is the agent
     (`agent_label=False`), and the locative reading is lost.
  R8 multi-word prepositions, one predicate: fixed ("next to" as case + fixed), an adjective or adverb head
     ("next" + obl "to"), and a noun from PREP_NOUNS with "of" ("in front of", "on top of", "to the left of"):
                                            "a man standing in front of a bus" -> (man, stand in front of, bus)
  R9 conjunctions: relations are copied to every conjunct of a subject or object; a later conjunct takes the
     first one's role:       "a man and a woman riding horses" -> (man, ride, horse), (woman, ride, horse)
     a modifier after the last conjunct is shared: "a dog and a cat on a bed" -> (dog, on, bed), (cat, on, bed)
  R10 a verb without a subject takes its head verb's (conj, xcomp, advcl):
                                            "a man sitting on a bench reading a book" -> (man, read, book)
      an xcomp whose head verb has an object takes that object (object control):
                                            "a man watching a dog catch a frisbee" -> (dog, catch, frisbee)
  R11 possessive nmod:poss:                 "a dog's collar"                  -> (dog, have, collar)

Written forms (`ParsedCaption.written`, the same objects and relations in the words of the caption, the forms of
Structure-CLIP's released triples): names as written ("tennis rackets"), a verb as written with its particles
("riding", "ridden", "sitting on", "picks up"; a possessive "has"), prepositions as above; attributes by their
lemma ("older" -> "old") and without numerals. The release's parser keeps a verb with a preposition only for
phrasal verbs ("sitting on"; else "on") and drops some relations (a copula with a preposition); these forms keep
the verb and every relation the rules find.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datamodules.graph import Entity, Relation, SceneGraph

RULES_VERSION = "4"  # 2: object control (R10); 3: R7 by the parser's agent label; 4: written forms. Bump whenever a rule changes: it is part of every cache key
NOUNS = ("NOUN", "PROPN")
VERBS = ("VERB", "AUX")
PREP_NOUNS = frozenset({"front", "top", "left", "right", "side", "middle", "back", "bottom", "edge", "center", "centre",
                        "rear"})  # "in front of", "on top of", "to the left of", "on the side of", ...
RELATIVE_PRONOUNS = frozenset({"who", "whom", "which", "that"})


@dataclass(frozen=True)
class ParsedCaption:
    """A parsed caption: its words with Penn tags (what ARO's order shuffles read), its scene graph, and the
    word positions that let negatives rewrite the caption text (entity names, attributes)."""

    text: str
    words: tuple[str, ...]
    xpos: tuple[str, ...]  # Penn Treebank tag of each word
    graph: SceneGraph
    spans: tuple[tuple[int, int], ...]  # (start, end) character offsets of each word in `text`
    object_words: tuple[tuple[int, ...], ...]  # per graph object: word indices of its name (compounds + head)
    attribute_words: tuple[tuple[int, ...], ...]  # per graph object: word index of each of its attributes
    written: SceneGraph | None = None  # `graph` in written forms (see the module docstring); None: the same as graph

    def __post_init__(self) -> None:
        n, k = len(self.words), len(self.graph.objects)
        if len(self.xpos) != n or len(self.spans) != n:
            raise ValueError(f"{self.text!r}: {n} words but {len(self.xpos)} tags and {len(self.spans)} spans")
        if len(self.object_words) != k or len(self.attribute_words) != k:
            raise ValueError(f"{self.text!r}: {k} objects but {len(self.object_words)} names and "
                             f"{len(self.attribute_words)} attribute lists")
        for o, ws, aw in zip(self.graph.objects, self.object_words, self.attribute_words):
            if not ws or len(aw) != len(o.attributes) or not all(0 <= i < n for i in (*ws, *aw)):
                raise ValueError(f"{self.text!r}: object {o.name!r} points at words outside the caption")
        if not all(0 <= s <= e <= len(self.text) for s, e in self.spans):
            raise ValueError(f"{self.text!r}: a word span lies outside the text")
        if self.written is not None and (
                len(self.written.objects) != k or [(r.subject, r.object) for r in self.written.relations]
                != [(r.subject, r.object) for r in self.graph.relations]):
            raise ValueError(f"{self.text!r}: the written forms do not have the graph's objects and relations")

    @property
    def written_graph(self) -> SceneGraph:
        """The graph in written forms (names and verbs as written, attributes lemmatised, no numerals)."""
        return self.written if self.written is not None else self.graph

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able containers, compact (the cache's record; words never hold a tab, tags never a space)."""
        return {
            "text": self.text, "words": "\t".join(self.words), "xpos": " ".join(self.xpos),
            "spans": [k for span in self.spans for k in span],
            "objects": [[o.name, list(o.attributes), list(w), list(a)]
                        for o, w, a in zip(self.graph.objects, self.object_words, self.attribute_words)],
            "relations": [[r.subject, r.predicate, r.object] for r in self.graph.relations],
            "written": None if self.written is None else {
                "objects": [[o.name, list(o.attributes)] for o in self.written.objects],
                "predicates": [r.predicate for r in self.written.relations]},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParsedCaption":
        """The inverse of `to_dict`; a malformed record raises ValueError (never a half-built caption)."""
        try:
            objects = [(str(name), tuple(map(str, attrs)), tuple(map(int, ws)), tuple(map(int, aws)))
                       for name, attrs, ws, aws in d["objects"]]
            entities = tuple(Entity(name, attrs) for name, attrs, _, _ in objects)
            graph = SceneGraph(entities, tuple(Relation(int(s), str(p), int(o)) for s, p, o in d["relations"]))
            spans = list(map(int, d["spans"]))
            w = d["written"]
            written = None
            if w is not None:
                names, preds = [o[0] for o in w["objects"]], list(w["predicates"])
                if (len(names) != len(entities) or not all(isinstance(x, str) for x in names + preds)
                        or not all(isinstance(o[1], list) and all(isinstance(a, str) for a in o[1]) for o in w["objects"])):
                    raise ValueError("its written forms are not the graph's names, attribute lists and predicates")
                written = SceneGraph(tuple(Entity(name, tuple(o[1])) for name, o in zip(names, w["objects"])),
                                     tuple(Relation(r.subject, p, r.object)
                                           for r, p in zip(graph.relations, preds, strict=True)))
            return cls(
                text=str(d["text"]), words=tuple(d["words"].split("\t")), xpos=tuple(d["xpos"].split(" ")),
                graph=graph, spans=tuple(zip(spans[::2], spans[1::2])),
                object_words=tuple(o[2] for o in objects), attribute_words=tuple(o[3] for o in objects),
                written=written,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"malformed parse record ({e.__class__.__name__}: {e})") from None


@dataclass(frozen=True)
class _Word:
    text: str
    lemma: str
    upos: str
    xpos: str
    deprel: str
    head: int  # index of the head word in the caption, -1 for the root


class _Tree:
    """The dependency tree of one caption, with the helpers the rules share."""

    def __init__(self, words: list[_Word], agent_label: bool = True) -> None:
        self.w, self.agent_label = words, agent_label
        self.kids: list[list[int]] = [[] for _ in words]
        for i, w in enumerate(words):
            k, steps = i, 0
            while k >= 0:  # every word reaches a root: heads in range, no cycle (a parse from any UD parser)
                if k >= len(words) or steps > len(words):
                    raise ValueError(f"word {i + 1} {w.text!r}: its heads do not lead to a root (not a tree)")
                k, steps = words[k].head, steps + 1
            if w.head >= 0:
                self.kids[w.head].append(i)

    def children(self, i: int, *deprels: str) -> list[int]:
        return [k for k in self.kids[i] if self.w[k].deprel in deprels]

    def head(self, i: int) -> int | None:
        return self.w[i].head if self.w[i].head >= 0 else None

    def base(self, i: int) -> str:
        return self.w[i].deprel.split(":")[0]

    def low(self, i: int) -> str:
        return self.w[i].text if self.w[i].upos == "PROPN" else self.w[i].text.lower()

    def conjuncts(self, i: int) -> list[int]:
        """i and the words coordinated with it (conj children, recursively), in text order."""
        out = [i]
        for k in self.children(i, "conj"):
            if self.w[k].upos == self.w[i].upos or {self.w[k].upos, self.w[i].upos} <= {"NOUN", "PROPN", "PRON"}:
                out += self.conjuncts(k)
        return sorted(out)

    def shared(self, i: int, dependent: int) -> list[int]:
        """The conjuncts of i that a dependent at position `dependent` modifies: all of them if it comes after
        the last one ("a dog and a cat on a bed"), else i alone ("a man with a hat and a woman")."""
        conj = self.conjuncts(i)
        return conj if dependent > conj[-1] else [i]

    def prep(self, i: int) -> str:
        """The preposition of word i: its case children with their fixed words ("on", "next to")."""
        words = []
        for c in self.children(i, "case"):
            if self.w[c].xpos != "POS":  # the possessive 's is a case mark, not a preposition
                words += [c, *self.children(c, "fixed")]
        return " ".join(self.w[k].text.lower() for k in sorted(words))

    def prep_noun(self, i: int) -> str | None:
        """For the noun of a multi-word preposition ("front" with case "in" and an nmod with "of"), the whole
        preposition ("in front of", "to the left of"); else None."""
        w = self.w[i]
        if w.upos != "NOUN" or w.lemma.lower() not in PREP_NOUNS or not self.children(i, "case"):
            return None
        if not any(self.prep(m) == "of" for m in self.children(i, "nmod")):
            return None
        words = sorted([*self.children(i, "case", "det"), i])
        return " ".join(self.w[k].text.lower() for k in words) + " of"

    def is_object(self, i: int) -> bool:
        w = self.w[i]
        return w.upos in NOUNS and self.base(i) not in ("compound", "flat", "fixed") and self.prep_noun(i) is None

    def resolve(self, i: int) -> int | None:
        """The object word that word i stands for: itself, or a relative pronoun's antecedent (R6)."""
        if self.is_object(i):
            return i
        w, h = self.w[i], self.head(i)
        relative = w.upos == "PRON" and w.lemma.lower() in RELATIVE_PRONOUNS
        antecedent = self.head(h) if h is not None and self.w[h].deprel == "acl:relcl" else None
        if relative and antecedent is not None:  # (a root labelled acl:relcl has no antecedent: nothing)
            return self.resolve(antecedent)
        return None

    def resolved(self, words: list[int], expand: bool = True) -> list[int]:
        """The object words that `words` stand for, each expanded over its conjuncts unless expand is False."""
        out = [self.resolve(k) for i in words for k in (self.conjuncts(i) if expand else [i])]
        return [k for k in out if k is not None]

    def verb_pred(self, v: int, written: bool = False) -> str:
        """The verb's lemma (or, `written`, its word as in the caption) with its particles ("pick up")."""
        head = self.w[v].text.lower() if written else self.w[v].lemma.lower()
        return " ".join([head, *(self.w[k].text.lower() for k in self.children(v, "compound:prt"))])

    def subjects(self, v: int, depth: int = 0) -> list[int]:
        """Object words that are the subject of predicate v (R5, R6, R10; conj-expanded, R9)."""
        for dep in ("nsubj", "nsubj:pass"):
            if self.children(v, dep):
                return self.resolved(self.children(v, dep))
        h = self.head(v)
        if h is None or depth > 8:
            return []
        if self.w[v].deprel == "acl" and self.resolve(h) is not None:
            return self.resolved(self.shared(h, v), expand=False)
        if self.base(v) == "xcomp" and self.w[h].upos in VERBS:  # object control: "watching a dog catch a ..."
            controller = self.resolved(self.children(h, "obj") or self.children(h, "iobj"))
            if controller:
                return controller
        if self.base(v) in ("conj", "xcomp", "advcl") and self.w[h].upos in (*VERBS, "ADJ"):
            return self.subjects(h, depth + 1)
        return []

    def patients(self, v: int) -> list[int]:
        """What a passive verb is done to: its nsubj:pass, or the noun a passive participle modifies (R7)."""
        if self.children(v, "nsubj:pass"):
            return self.resolved(self.children(v, "nsubj:pass"))
        h = self.head(v)
        if self.w[v].deprel == "acl" and self.w[v].xpos == "VBN" and h is not None and self.resolve(h) is not None:
            return [self.resolve(h)]
        return []

    def carries_relation(self, a: int) -> bool:
        """An adjective or adverb that governs a prepositional phrase ("next to", "close to") is a relation."""
        return any(self.prep(k) for k in self.children(a, "obl", "nmod"))


def _attach(t: _Tree, o: int) -> tuple[int, str]:
    """(carrier, preposition) of object word o: the word whose deprel and head say how o relates to the rest,
    after folding multi-word prepositions (R8) and giving a later conjunct its first conjunct's role (R9)."""
    h = t.head(o)
    if t.w[o].deprel == "conj" and h is not None and t.w[h].upos in (*NOUNS, "PRON"):
        carrier, prep = _attach(t, h)
        return carrier, t.prep(o) or prep
    carrier, prep = o, t.prep(o)
    if h is not None and t.w[o].deprel == "nmod" and prep == "of" and t.prep_noun(h):
        carrier, prep = h, t.prep_noun(h) or ""
        h = t.head(h)
    if h is not None and prep and t.base(carrier) in ("obl", "nmod") and t.w[h].upos in ("ADJ", "ADV"):
        carrier, prep = h, f"{t.w[h].text.lower()} {prep}"
    return carrier, prep


def _relations_of(t: _Tree, o: int) -> list[tuple[int, str, str, int]]:
    """Relations (subject word, predicate, predicate as written, object word) in which word o is the object
    (R1-R11)."""
    obj = t.resolve(o)
    if obj is None:
        return []
    c, prep = _attach(t, o)
    dep, h = t.w[c].deprel, t.head(c)
    if prep and t.children(c, "cop"):  # R3: "the cat is on the mat" (the noun or adjective is the predicate)
        return [(s, prep, prep, obj) for s in t.subjects(c)]
    if h is None:
        return []
    verb = t.w[h].upos in VERBS
    if verb and dep in ("obj", "iobj") and not prep:  # R1
        return [(s, t.verb_pred(h), t.verb_pred(h, written=True), obj) for s in t.subjects(h)]
    if verb and prep and t.base(c) in ("obl", "advmod"):
        if dep == "obl:agent" or (not t.agent_label and prep == "by" and t.patients(h)):  # R7: agent -> subject
            return [(obj, t.verb_pred(h), t.verb_pred(h, written=True), p) for p in t.patients(h)]
        if t.w[h].lemma.lower() == "be":  # R2, existential "be"
            return [(s, prep, prep, obj) for s in t.subjects(h)]
        pred, written = f"{t.verb_pred(h)} {prep}", f"{t.verb_pred(h, written=True)} {prep}"  # R2
        return [(s, pred, written, obj) for s in t.subjects(h)]
    gov = t.resolve(h)
    if gov is not None and dep == "nmod:poss":  # R11: o is the possessor
        return [(obj, "have", "has", gov)]
    if gov is not None and prep and t.base(c) in ("nmod", "amod", "advmod", "obl"):  # R4
        return [(g, prep, prep, obj) for g in t.resolved(t.shared(h, c), expand=False)]
    return []


def _attributes(t: _Tree) -> dict[int, list[int]]:
    """Object word -> attribute words (A1-A3)."""
    out: dict[int, set[int]] = {i: set() for i in range(len(t.w)) if t.is_object(i)}

    def adjectives(a: int) -> list[int]:
        """a and the adjectives coordinated with it that have no predicate of their own."""
        return [k for k in t.conjuncts(a)
                if not t.carries_relation(k) and (k == a or not t.children(k, "nsubj", "cop"))]

    for n in out:
        for a in t.children(n, "amod"):
            out[n].update(adjectives(a))
        out[n].update(t.children(n, "nummod"))
    for a, w in enumerate(t.w):
        if w.upos == "ADJ" and t.children(a, "cop") and not t.carries_relation(a):
            for s in t.subjects(a):
                out[s].update(adjectives(a))
    return {n: sorted(v) for n, v in out.items()}


def _words(sentence: Any) -> tuple[list[_Word], list[Any]]:
    """The words and the tokens of a stanza Sentence or Document (its sentences concatenated)."""
    sentences = sentence.sentences if hasattr(sentence, "sentences") else [sentence]
    words, tokens, offset = [], [], 0
    for s in sentences:
        for w in s.words:
            if w.head is None or w.deprel is None:
                raise ValueError(f"{s.text!r}: word {w.id} {w.text!r} has no head or deprel (is the depparse missing?)")
            head = w.head - 1 + offset if w.head else -1
            words.append(_Word(w.text, w.lemma or w.text, w.upos or "X", w.xpos or "_", w.deprel, head))
        tokens += s.tokens
        offset += len(s.words)
    return words, tokens


def _spans(text: str, tokens: list[Any]) -> list[tuple[int, int]]:
    """Character span of each word: its token's place in the text (the words of a multi-word token share it)."""
    spans, cursor = [], 0
    for tok in tokens:
        k = text.find(tok.text, cursor)
        if k < 0 or text[cursor:k].strip():
            raise ValueError(f"caption {text!r}: token {tok.text!r} is not where the parse puts it in the text")
        cursor = k + len(tok.text)
        spans += [(k, cursor)] * len(tok.words)
    return spans


def graph_from_sentence(sentence: Any, text: str | None = None, agent_label: bool = True) -> ParsedCaption:
    """The scene graph of one parsed caption (a stanza Sentence, or a Document whose sentences are joined),
    with the word positions negatives need. `text` defaults to the sentence's (a CoNLL-U `# text =`).
    `agent_label`: the parser labels passive agents `obl:agent`, so a plain `obl` "by" is locative (R7)."""
    words, tokens = _words(sentence)
    text = text if text is not None else (getattr(sentence, "text", None) or " ".join(t.text for t in tokens))
    try:
        t = _Tree(words, agent_label)
    except ValueError as e:
        raise ValueError(f"caption {text!r}: {e}") from None
    objects = [i for i in range(len(words)) if t.is_object(i)]
    index = {w: k for k, w in enumerate(objects)}
    attrs = _attributes(t)
    triples, written_predicates = [], []
    for o in range(len(words)):
        for s, p, wp, ob in _relations_of(t, o):
            triple = (index[s], p, index[ob])
            if s != ob and triple not in triples:
                triples.append(triple)
                written_predicates.append(wp)

    def name_words(i: int) -> list[int]:
        return sorted([i, *(k for c in t.children(i, "compound", "flat", "flat:name") for k in name_words(c))])

    def name(i: int, ws: list[int]) -> str:
        head = t.w[i].text if t.w[i].upos == "PROPN" else t.w[i].lemma.lower()
        return " ".join(head if k == i else t.low(k) for k in ws)

    names = [name_words(i) for i in objects]
    entities = tuple(Entity(name(i, ws), tuple(t.w[a].text.lower() for a in attrs[i])) for i, ws in zip(objects, names))
    written = tuple(Entity(" ".join(t.low(k) for k in ws),
                           tuple(t.w[a].lemma.lower() for a in attrs[i] if t.w[a].upos != "NUM" and t.w[a].xpos != "CD"))
                    for i, ws in zip(objects, names))
    return ParsedCaption(
        text=text, words=tuple(w.text for w in words), xpos=tuple(w.xpos for w in words),
        graph=SceneGraph(entities, tuple(Relation(s, p, o) for s, p, o in triples)),
        spans=tuple(_spans(text, tokens)), object_words=tuple(map(tuple, names)),
        attribute_words=tuple(tuple(attrs[i]) for i in objects),
        written=SceneGraph(written, tuple(Relation(s, wp, o) for (s, _, o), wp in zip(triples, written_predicates))),
    )
