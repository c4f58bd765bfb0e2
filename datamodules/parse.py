"""Captions -> ParsedCaption (words, Penn tags, scene graph), parsed once and cached.

Where a parse comes from, in order:
1. CoNLL-U files the user gives (`ParserConfig.conllu`, read with Stanza's own reader and matched to captions by
   their `# text = ` comment): the benchmark fixtures and CI run this way without a model, and users can bring
   parses from any UD parser.
2. The cache: JSON lines under `cache_dir/<version>/`, one record per caption keyed by a hash of (text, version);
   the version changes with the rules (`RULES_VERSION`) and with the parser (Stanza's package version and model
   files, or the CoNLL-U files' contents, and an explicit `agent_label`), so a stale parse is never reused. Each
   writer adds whole new shard files (written to a temporary name, then renamed), so a crash never leaves half a
   file and two processes never write the same file. A line that is not valid JSON, whose key does not match its text, or whose record is
   inconsistent is ignored with a warning that names the file and line, and that caption is parsed again.
3. The backend (`ParserConfig.backend`, a registry): "stanza" runs `tokenize,pos,lemma,depparse` from a local
   model directory (no download is ever attempted), batched, on the GPU when there is one; "conllu" parses
   nothing itself, for machines without a model. A missing model gives one error with the command that downloads it.

`python -m datamodules.parse CAPTIONS.txt` parses a file of captions (one a line) and prints captions/s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from configs.files import write_atomic
from configs.registry import Registry
from datamodules.parse_rules import RULES_VERSION, ParsedCaption, graph_from_sentence

__all__ = ["BACKENDS", "CaptionNotParsed", "CaptionParser", "ParsedCaption", "ParserConfig", "ParserModelMissing",
           "graph_from_sentence"]
PROCESSORS = "tokenize,pos,lemma,depparse"
AGENT_PROBE = "A horse is ridden by a man."  # R7: does the parser label "man" obl:agent?
SHARD_SIZE = 10_000  # captions per cache shard: an interrupted run loses at most this many parses


@dataclass
class ParserConfig:
    """Where parses come from and where they are cached."""

    backend: str = "stanza"  # the parser behind the cache: a name in BACKENDS ("stanza", "conllu")
    model_dir: str | None = None  # Stanza resources dir; None -> $STANZA_RESOURCES_DIR or ~/stanza_resources
    conllu: list[str] = field(default_factory=list)  # pre-parsed CoNLL-U files ('# text = <caption>' per sentence)
    use_gpu: bool | None = None  # None: the GPU when there is one
    batch_size: int = 256  # captions per call to the backend
    # Does the parser label passive agents `obl:agent` (rule R7)? None: ask it (Stanza: its parse of a probe
    # caption; CoNLL-U files, each on its own: not if a passive's "by" phrase is plain `obl` and none is
    # `obl:agent`). An explicit value is part of the parse cache's version. With False a plain `obl` "by" of a
    # passive verb is read as the agent ("ridden by a man"), with True as a place ("parked by a tree").
    agent_label: bool | None = None
    cache_dir: str = ".cache/parses"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"ParserConfig.batch_size must be at least 1, got {self.batch_size}")
        if isinstance(self.conllu, str):  # one file given as a string, not a list
            self.conllu = [self.conllu]


class ParserModelMissing(FileNotFoundError):
    """The Stanza model directory (or its resources.json, or its English models) is not there."""


class CaptionNotParsed(LookupError):
    """A caption that is neither cached nor in the CoNLL-U files, with a backend that parses nothing."""


class CacheWarning(UserWarning):
    """Lines of the parse cache that were ignored (the captions are parsed again)."""


class AgentLabelWarning(UserWarning):
    """A CoNLL-U file judged to come from a parser without `obl:agent` on few passive "by" phrases."""


# how a CoNLL-U file's agent label is judged (part of its parses' cache version); 2: reduced relatives count
EVIDENCE_VERSION = 2
AGENT_EVIDENCE = 3  # passive "by" phrases labelled plain `obl` (and no `obl:agent`) that judge a file without a warning


class Backend(Protocol):
    """A parser: `version()` names it for the cache; `parse(texts)` gives one stanza Sentence or Document per text."""

    def version(self) -> str: ...

    def parse(self, texts: list[str]) -> list[Any]: ...

    def labels_agents(self) -> bool: ...


BACKENDS: Registry[Callable[[ParserConfig], Backend]] = Registry("caption parser backend")


def model_dir(cfg: ParserConfig) -> Path:
    """The Stanza resources directory: the config's, else $STANZA_RESOURCES_DIR, else ~/stanza_resources."""
    default = os.environ.get("STANZA_RESOURCES_DIR") or Path.home() / "stanza_resources"
    return Path(cfg.model_dir or default).expanduser()


def download_command(directory: Path) -> str:
    return f"python -c \"import stanza; stanza.download('en', model_dir='{directory}', processors='{PROCESSORS}')\""


def _missing(directory: Path, what: str) -> ParserModelMissing:
    return ParserModelMissing(
        f"Stanza English model not found: {directory} {what}. Download it once (about 0.5 GB) with\n"
        f"  {download_command(directory)}\n"
        f"or set ParserConfig.model_dir (or $STANZA_RESOURCES_DIR) to a directory that has it; "
        f"nothing is downloaded here."
    )


@BACKENDS.register("stanza")
class StanzaBackend:
    """Stanza's English pipeline from a local directory (`download_method=None`), created on first use."""

    def __init__(self, cfg: ParserConfig) -> None:
        self.cfg, self.dir, self._nlp, self._version, self._agents = cfg, model_dir(cfg), None, None, None

    def _check(self) -> None:
        if not self.dir.is_dir():
            raise _missing(self.dir, "does not exist")
        if not (self.dir / "resources.json").is_file():
            raise _missing(self.dir, "has no resources.json")
        if not (self.dir / "en").is_dir():
            raise _missing(self.dir, "has no English models (en/)")

    def version(self) -> str:
        """Rules, Stanza's package version, resources.json and the English model files (names and sizes)."""
        if self._version is None:
            self._check()
            from importlib.metadata import version

            h = hashlib.sha256((self.dir / "resources.json").read_bytes())
            for f in sorted((self.dir / "en").rglob("*")):
                if f.is_file():
                    h.update(f"{f.relative_to(self.dir)}:{f.stat().st_size}\n".encode())
            self._version = f"r{RULES_VERSION}-stanza{version('stanza')}-{h.hexdigest()[:12]}"
        return self._version

    def pipeline(self) -> Any:
        if self._nlp is None:
            self._check()
            import stanza

            try:
                self._nlp = stanza.Pipeline(
                    "en", dir=str(self.dir), processors=PROCESSORS, download_method=None, use_gpu=self.cfg.use_gpu,
                    tokenize_no_ssplit=True, logging_level="WARN",  # a caption is one sentence
                )
            except (FileNotFoundError, OSError) as e:
                raise _missing(self.dir, f"is incomplete ({e})") from None
        return self._nlp

    def parse(self, texts: list[str]) -> list[Any]:
        return list(self.pipeline().bulk_process(list(texts)))

    def labels_agents(self) -> bool:
        """Whether the model labels a passive agent `obl:agent`, read from its parse of a probe caption (the
        answer is the model's, which `version()` names)."""
        if self._agents is None:
            doc = self.pipeline().bulk_process([AGENT_PROBE])[0]
            self._agents = any(w.deprel == "obl:agent" for s in doc.sentences for w in s.words)
        return self._agents


@BACKENDS.register("conllu")
class ConlluOnly:
    """No parser: every caption must come from the CoNLL-U files or the cache (CI, machines without a model)."""

    def __init__(self, cfg: ParserConfig) -> None:
        self.files = cfg.conllu

    def version(self) -> str:
        return f"r{RULES_VERSION}-conllu-only"

    def parse(self, texts: list[str]) -> list[Any]:
        raise CaptionNotParsed(
            f"{len(texts)} caption(s) are neither cached nor in the CoNLL-U files {self.files}, and backend 'conllu' "
            f"parses nothing itself; first: {texts[0]!r}. Add their parses to a file, or use backend 'stanza'."
        )

    def labels_agents(self) -> bool:
        return True  # it parses nothing


class ConlluFiles:
    """Pre-parsed captions from CoNLL-U files, matched by their `# text = ` comment (the first parse of a text wins)."""

    def __init__(self, paths: Sequence[str], agent_label: bool | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.agent_label = agent_label  # set: every file's answer, and the files are not asked
        self._sentences: dict[str, tuple[Any, str, bool]] | None = None
        h = hashlib.sha256()
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: CoNLL-U file not found (ParserConfig.conllu)")
            h.update(p.read_bytes())
        self.version = f"r{RULES_VERSION}-conllu{EVIDENCE_VERSION}-{h.hexdigest()[:12]}"

    def sentences(self) -> dict[str, tuple[Any, str, bool]]:
        """text -> (stanza Sentence, where it is, whether its file's parser labels agents), reading the files on
        first use."""
        if self._sentences is None:
            from stanza.utils.conll import CoNLL

            self._sentences = {}
            for p in self.paths:
                try:
                    doc = CoNLL.conll2doc(input_file=str(p))
                except Exception as e:  # stanza raises its own CoNLLError, ValueError, IndexError on bad lines
                    raise ValueError(f"{p}: not valid CoNLL-U: {e.__cause__ or e}") from None
                agents = labels_agents(doc.sentences, str(p)) if self.agent_label is None else self.agent_label
                for k, s in enumerate(doc.sentences, start=1):
                    if not s.text:
                        raise ValueError(f"{p}: sentence {k} has no '# text = ' comment, so no caption matches it")
                    self._sentences.setdefault(s.text, (s, f"{p}: sentence {k}", agents))
        return self._sentences


def labels_agents(sentences: Sequence[Any], where: str = "a CoNLL-U file") -> bool:
    """Whether the parser of one CoNLL-U file labels passive agents `obl:agent`, from the file itself. Any
    `obl:agent` says it does. A passive verb's "by" phrase labelled plain `obl` (a passive clause's, "was hit by",
    or a reduced relative's, "a kite flown by a boy") says it does not, unless the file has an `obl:agent`: a
    current parser labels most such phrases `obl:agent` and leaves `obl` only to the rarer place ("parked by a
    tree"). Fewer than AGENT_EVIDENCE of them is thin evidence, and a warning asks for `parser.agent_label`. A
    file with neither holds no passive "by" phrase, where the answer changes nothing; it is read as a current
    parser's (True)."""
    plain = 0
    for s in sentences:
        words = s.words
        for w in words:
            if w.deprel == "obl:agent":
                return True
            if w.deprel == "obl" and w.head and any(c.head == w.id and c.deprel == "case" and c.text.lower() == "by"
                                                    for c in words):
                verb = words[w.head - 1]
                plain += ((verb.deprel == "acl" and verb.xpos == "VBN")  # a passive participle modifying a noun (R7)
                          or any(c.head == w.head and c.deprel in ("aux:pass", "nsubj:pass") for c in words))
    if 0 < plain < AGENT_EVIDENCE:
        warnings.warn(f"{where}: read as from a parser that labels passive agents plain `obl` (UD English before "
                      f"EWT 2.13) on {plain} passive \"by\" phrase(s) and no `obl:agent`; a current parser labels "
                      "a place that way too (\"parked by a tree\"). Set parser.agent_label (true: `obl:agent` "
                      "marks agents) to be sure", AgentLabelWarning, stacklevel=2)
    return plain == 0


class ParseCache:
    """JSON-lines shards under `root/<version>/`; records are checked when read, never trusted blindly."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: dict[str, dict[str, tuple[dict, str]]] = {}  # version -> key -> (record, "file:line")

    @staticmethod
    def key(text: str, version: str) -> str:
        return hashlib.sha256(f"{version}\n{text}".encode()).hexdigest()[:32]

    def _load(self, version: str) -> dict[str, tuple[dict, str]]:
        if version not in self._index:
            index: dict[str, tuple[dict, str]] = {}
            for shard in sorted((self.root / version).glob("*.jsonl")):
                bad: list[str] = []
                # lines end at "\n" only: a caption may hold U+2028 or U+0085, which json.dumps leaves as they are
                # and str.splitlines would split at
                for n, line in enumerate(shard.read_text(encoding="utf-8").split("\n"), start=1):
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict) or rec.get("key") != self.key(rec["parse"]["text"], version):
                            raise ValueError("its key does not match its text")
                    except (ValueError, KeyError, TypeError) as e:
                        bad.append(f"line {n}: {e}")
                        continue
                    index.setdefault(rec["key"], (rec["parse"], f"{shard}:{n}"))
                if bad:
                    warnings.warn(f"{shard}: {len(bad)} corrupt parse-cache line(s) ignored, parsed again "
                                  f"(first: {bad[0]})", CacheWarning, stacklevel=3)
            self._index[version] = index
        return self._index[version]

    def get(self, version: str, text: str) -> ParsedCaption | None:
        found = self._load(version).get(self.key(text, version))
        if found is None:
            return None
        try:
            parsed = ParsedCaption.from_dict(found[0])
        except ValueError as e:
            warnings.warn(f"{found[1]}: corrupt parse-cache record ignored, parsed again ({e})", CacheWarning,
                          stacklevel=3)
            return None
        return parsed if parsed.text == text else None

    def put(self, version: str, parsed: Sequence[ParsedCaption]) -> None:
        """Append records as new shard files (atomic; one name per writer, so processes never collide)."""
        index = self._load(version)
        for start in range(0, len(parsed), SHARD_SIZE):
            chunk = parsed[start:start + SHARD_SIZE]
            folder = self.root / version
            folder.mkdir(parents=True, exist_ok=True)
            shard = folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            lines = [json.dumps({"key": self.key(p.text, version), "parse": p.to_dict()}, ensure_ascii=False)
                     for p in chunk]
            write_atomic(shard, "\n".join(lines) + "\n")
            for n, (p, line) in enumerate(zip(chunk, lines), start=1):
                index.setdefault(self.key(p.text, version), (json.loads(line)["parse"], f"{shard}:{n}"))


class CaptionParser:
    """Parses captions into ParsedCaption: CoNLL-U files first, then the cache, then the backend (batched)."""

    def __init__(self, cfg: ParserConfig) -> None:
        self.cfg = cfg
        self.backend = BACKENDS.get(cfg.backend)(cfg)
        self.files = ConlluFiles(cfg.conllu, cfg.agent_label) if cfg.conllu else None
        self.cache = ParseCache(Path(cfg.cache_dir))
        self.counts = {"cached": 0, "conllu": 0, "parsed": 0}  # where the captions of parse() calls came from

    def version(self) -> str:
        """Names every parse this parser can give (the CoNLL-U files' version and the backend's), for caches of its
        output such as a data source's prepared records."""
        return "+".join(([self._files_version()] if self.files is not None else []) + [self._backend_version()])

    def _setting(self) -> str:
        """An explicit `agent_label` is part of the cache keys; asked of the parser, the parser's version names it."""
        return "" if self.cfg.agent_label is None else f"-agents{int(self.cfg.agent_label)}"

    def _files_version(self) -> str:
        return self.files.version + self._setting()

    def _backend_version(self) -> str:
        return self.backend.version() + self._setting()

    def _from_cache(self, version: str, texts: list[str], found: dict[str, ParsedCaption]) -> list[str]:
        for t in texts:
            p = self.cache.get(version, t)
            if p is not None:
                found[t] = p
                self.counts["cached"] += 1
        return [t for t in texts if t not in found]

    def parse(self, texts: Sequence[str]) -> list[ParsedCaption]:
        """One ParsedCaption per text (duplicates are parsed once); new parses are cached."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"caption {i} is empty or not text: {t!r}")
        found: dict[str, ParsedCaption] = {}
        todo = list(dict.fromkeys(texts))
        if self.files is not None and todo:
            version = self._files_version()
            todo = self._from_cache(version, todo, found)
            if todo:
                sentences = self.files.sentences()
                new = []
                for t in (t for t in todo if t in sentences):
                    sentence, where, agents = sentences[t]
                    try:
                        new.append(graph_from_sentence(sentence, text=t, agent_label=agents))
                    except ValueError as e:
                        raise ValueError(f"{where}: {e}") from None
                self.cache.put(version, new)
                found.update((p.text, p) for p in new)
                self.counts["conllu"] += len(new)
                todo = [t for t in todo if t not in found]
        if todo:
            version = self._backend_version()
            todo = self._from_cache(version, todo, found)
            pending: list[ParsedCaption] = []
            for start in range(0, len(todo), self.cfg.batch_size):
                chunk = todo[start:start + self.cfg.batch_size]
                docs = self.backend.parse(chunk)
                agents = self.cfg.agent_label if self.cfg.agent_label is not None else self.backend.labels_agents()
                pending += [graph_from_sentence(doc, text=t, agent_label=agents) for t, doc in zip(chunk, docs)]
                if len(pending) >= SHARD_SIZE or start + self.cfg.batch_size >= len(todo):
                    self.cache.put(version, pending)
                    found.update((p.text, p) for p in pending)
                    self.counts["parsed"] += len(pending)
                    pending = []
        return [found[t] for t in texts]

    def tag(self, texts: Sequence[str]) -> list[list[tuple[str, str]]]:
        """(word, Penn tag) for every word of every text."""
        return [list(zip(p.words, p.xpos)) for p in self.parse(texts)]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse a text file of captions (one a line) and print captions/s: run twice to see the cached speed."""
    ap = argparse.ArgumentParser(prog="python -m datamodules.parse", description=main.__doc__)
    ap.add_argument("captions", help="a text file, one caption a line")
    ap.add_argument("--backend", default="stanza", help=f"one of {', '.join(BACKENDS.names())}")
    ap.add_argument("--conllu", nargs="*", default=[], help="pre-parsed CoNLL-U files")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--cache-dir", default=ParserConfig.cache_dir)
    ap.add_argument("--batch-size", type=int, default=ParserConfig.batch_size)
    ap.add_argument("--cpu", action="store_true", help="never use the GPU")
    ap.add_argument("--show", type=int, default=0, help="print the graphs of the first N captions")
    ap.add_argument("--agent-label", choices=["auto", "yes", "no"], default="auto",
                    help="does the parser label passive agents obl:agent (rule R7)? auto: ask it")
    args = ap.parse_args(argv)
    try:
        texts = [line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines() if line.strip()]
        parser = CaptionParser(ParserConfig(
            backend=args.backend, model_dir=args.model_dir, conllu=list(args.conllu),
            use_gpu=False if args.cpu else None, batch_size=args.batch_size, cache_dir=args.cache_dir,
            agent_label={"auto": None, "yes": True, "no": False}[args.agent_label]))
        start = time.perf_counter()
        parsed = parser.parse(texts)
        seconds = time.perf_counter() - start
    except (OSError, ValueError, KeyError, LookupError) as e:  # a missing model or file, a caption it cannot read
        sys.exit(f"error: {e.args[0] if len(e.args) == 1 else e}")
    for p in parsed[: args.show]:
        print(f"{p.text}\n  objects: {[o.phrase() for o in p.graph.objects]}"
              f"\n  relations: {p.graph.relation_triples()}")
    c = parser.counts
    print(f"{len(texts)} captions ({len(set(texts))} distinct: {c['cached']} from the cache, {c['conllu']} from "
          f"CoNLL-U, {c['parsed']} parsed by {args.backend}) in {seconds:.2f} s: "
          f"{len(texts) / max(seconds, 1e-9):,.0f} captions/s")


if __name__ == "__main__":
    main()
