"""The world's knowledge base: fixed facts, held-out phrasings, the knowledge eval set, knobs."""

import math
import random
import re

import pytest
import torch
from world_golden import ByteTokenizer, world_fingerprints

from moesaic.batch import DocKind
from moesaic.config import KNOWLEDGE_ATTRIBUTES, load_config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer
from moesaic.data.tokenizer import tokenizer_key, train_tokenizer, world_corpus
from moesaic.data.world import knowledge
from moesaic.data.world.generators import WorldSource
from moesaic.errors import ConfigError

# The world without a knowledge base, fingerprinted before the knowledge base existed
# (tests/world_golden.py): turning the knob off must give exactly this world.
GOLDEN = {
    "stream": "1debe2f98c7cdbea",
    "eval/text": "f39cef858e06c1b3",
    "eval/ood_text": "31e3d2865990dd27",
    "eval/image": "e75b72f63b96af77",
    "eval/caption": "098ab4e0afb26c86",
    "corpus": "d3f19a626b3f2dd2",
    "scenes": "d0eb62113d8f38d6",
    "parser": "09bf360420fb4895",
}

NAME = r"[A-Z][a-z]+(?: [A-Z][a-z]+)?"


def _cfg(*extra):
    """Rows long enough for a whole biography in bytes (`ByteTokenizer`)."""
    base = ["data.seq_len=1024", "data.batch_size=2", "data.mix={text: 1}"]
    return load_config("tiny", [*base, *extra]).data


def _patterns():
    """(regex, attribute index, phrasing) for every template of every attribute."""
    out = []
    for a, attr in enumerate(knowledge.ATTRIBUTES):
        values = "|".join(re.escape(v) for v in sorted(attr.values, key=len, reverse=True))
        for phrasing in knowledge.PHRASINGS:
            for t in attr.templates(phrasing):
                body = re.escape(t).replace(r"\{name\}", f"(?P<name>{NAME})")
                body = body.replace(r"\{value\}", f"(?P<value>{values})")
                out.append((re.compile(f"^{body}$"), a, phrasing))
    return out


PATTERNS = _patterns()


def parse(doc: str) -> list[tuple[int, str, str, str]]:
    """Sentences of a biography as (attribute, phrasing, name, value); each sentence must match
    exactly one template."""
    facts = []
    for sentence in re.split(r"(?<=\.) ", doc):
        hits = [(a, ph, m) for rx, a, ph in PATTERNS if (m := rx.match(sentence))]
        assert len(hits) == 1, (sentence, hits)
        a, ph, m = hits[0]
        facts.append((a, ph, m["name"], m["value"]))
    return facts


def _documents(batches, tok):
    """Text of every non-padding document in the batches, in order."""
    out = []
    for b in batches:
        for r in range(b.tokens.shape[0]):
            for d in b.doc_id[r].unique().tolist():
                at = b.doc_id[r] == d
                if int(b.doc_kind[r][at][0]) != DocKind.PAD:
                    out.append(tok.decode(b.tokens[r][at].tolist()))
    return out


# ------------------------------------------------------------------ the knowledge base


def test_base_is_fixed_nested_and_unique():
    build = knowledge.knowledge_base.__wrapped__  # bypass the cache: regenerate
    a, b = build(300, 6), build(300, 6)
    assert a == b and len(a.entities) == 300
    assert len({e.name for e in a.entities}) == 300
    assert build(100, 6).entities == a.entities[:100]  # more people only adds people
    assert build(100, 8).entities == a.entities[:100]  # more attributes only adds facts
    assert a.entities[0] != a.entities[1]
    values = [set(e.values[i] for e in a.entities) for i in range(KNOWLEDGE_ATTRIBUTES)]
    assert all(len(v) > 10 for v in values)  # values are spread, not constant


def test_information_content():
    # Σ log2 |values| per person: years 1900-1999, 64 towns, 32 occupations, 16 colours,
    # 24 pets, 48 employers (the first six attributes)
    per_person = math.log2(100) + 6 + 5 + 4 + math.log2(24) + math.log2(48)
    assert knowledge.knowledge_base(10, 6).bits == pytest.approx(10 * per_person)
    assert knowledge.bits_per_entity(8) == pytest.approx(per_person + 5 + 4)
    assert len(knowledge.ATTRIBUTES) == KNOWLEDGE_ATTRIBUTES


def test_biography_states_the_base_facts_once_each():
    kb = knowledge.knowledge_base(50, 6)
    people = {e.name: e for e in kb.entities}
    firsts = {e.first for e in kb.entities}
    rng = random.Random(0)
    for _ in range(200):
        facts = parse(kb.document(rng))
        assert sorted(a for a, *_ in facts) == list(range(6))
        full = facts[0][2]
        person = people[full]  # the first sentence names the person in full
        for a, phrasing, name, value in facts:
            assert phrasing == "train" and name in (full, person.first) and name in firsts | {full}
            assert value == person.value(a)


def test_biography_pieces_mark_exactly_the_values():
    kb = knowledge.knowledge_base(20, 8)
    rng = random.Random(1)
    for _ in range(100):
        pieces = kb.biography(rng, "eval")
        doc = "".join(t for t, _ in pieces)
        facts = parse(doc)
        assert [t for t, v in pieces if v] == [" " + value for *_, value in facts]
        assert all(ph == "eval" for _, ph, *_ in facts)


def test_share_picks_exactly_that_fraction_of_text_documents():
    for share in (0.3, 0.5, 1.0):
        picks = [knowledge.is_biography(i, share) for i in range(1000)]
        assert sum(picks) == math.floor(1000 * share)
        assert sum(picks[:77]) == math.floor(77 * share)


# ------------------------------------------------------------------ in the world


def test_knob_off_is_the_world_bit_for_bit():
    """GOLDEN holds the world's fingerprints before the knobs existed; eval sets added since
    (the unconditional image set) are checked only for explicit vs implicit defaults."""
    got = world_fingerprints()
    assert {k: got[k] for k in GOLDEN} == GOLDEN
    explicit = ["data.knowledge.entities=0", "data.max_objects=3"]
    assert world_fingerprints(explicit) == got


def test_knowledge_replaces_only_the_picked_text_documents():
    plain = WorldSource.from_config(_cfg(), "train")
    cfg = _cfg("data.knowledge.entities=40", "data.knowledge.share=0.25")
    world = WorldSource.from_config(cfg, "train")
    for i in range(200):
        a = plain.record("text", i, random.Random(i)).text
        b = world.record("text", i, random.Random(i)).text
        if knowledge.is_biography(i, 0.25):
            assert parse(b) and a != b
        else:
            assert a == b
    for kind in ("ood_text", "caption_image"):  # other kinds, OOD text included, are unchanged
        assert (
            plain.record(kind, 3, random.Random(3)).text
            == world.record(kind, 3, random.Random(3)).text
        )


def test_ood_text_and_image_sets_unchanged_with_knowledge_on():
    on = world_fingerprints(["data.knowledge.entities=100"])
    for key in ("eval/ood_text", "eval/image", "eval/caption", "corpus", "scenes", "parser"):
        assert on[key] == GOLDEN[key], key
    assert on["stream"] != GOLDEN["stream"] and on["eval/text"] != GOLDEN["eval/text"]
    assert "eval/knowledge" in on


def test_data_seed_changes_documents_not_facts():
    tok = ByteTokenizer()
    kb = knowledge.knowledge_base(30, 6)
    people = {e.name: e for e in kb.entities}
    docs = {}
    for seed in (0, 1, 0):
        cfg = _cfg("data.knowledge.entities=30", "data.knowledge.share=1.0", f"data.seed={seed}")
        stream = build_stream(cfg, tok)
        batches = [next(stream) for _ in range(4)]
        texts = _documents(batches, tok)
        for doc in texts:
            facts = parse(doc)
            person = people[facts[0][2]]
            assert all(value == person.value(a) for a, _, _, value in facts)
        docs.setdefault(seed, []).append(texts)
    assert docs[0][0] == docs[0][1]  # same seed: the same documents
    assert docs[0][0] != docs[1][0]  # another seed: other documents, the same facts


def test_held_out_phrasings_never_reach_training_text():
    tok = ByteTokenizer()
    cfg = _cfg("data.knowledge.entities=200", "data.knowledge.attributes=8")
    stream = build_stream(cfg, tok)
    docs = _documents([next(stream) for _ in range(60)], tok)
    bios = [d for d in docs if all(any(rx.match(s) for rx, *_ in PATTERNS)
                                   for s in re.split(r"(?<=\.) ", d))]  # fmt: skip
    assert len(bios) > 100 and len(docs) - len(bios) > 100  # both kinds were drawn
    phrasings = {ph for d in bios for _, ph, *_ in parse(d)}
    assert phrasings == {"train"}
    used = {(a, rx.pattern) for d in bios for rx, a, _ in PATTERNS
            for s in re.split(r"(?<=\.) ", d) if rx.match(s)}  # fmt: skip
    assert len(used) == sum(len(a.train_templates) for a in knowledge.ATTRIBUTES)
    # the literal wording of every held-out phrasing is absent from all training text,
    # general text and the tokenizer corpus included
    fragments = [f for a in knowledge.ATTRIBUTES for t in a.eval_templates
                 for f in re.split(r"\{name\}|\{value\}", t) if len(f.split()) >= 3]  # fmt: skip
    assert len(fragments) >= len(knowledge.ATTRIBUTES)
    corpus = list(world_corpus(0, knowledge=True))
    for text in docs + corpus:
        assert not any(f in text for f in fragments), text


def test_knowledge_eval_set_is_held_out_phrasing_scored_on_values():
    tok = ByteTokenizer()
    kb = knowledge.knowledge_base(60, 6)
    people = {e.name: e for e in kb.entities}
    sets = build_eval_sets(_cfg("data.knowledge.entities=60"), tok, 1234, 2)
    assert set(sets) == {
        "text", "ood_text", "image", "image_uncond", "caption", "knowledge", "video",
        "action_video",
    }  # fmt: skip
    values = []
    for b in sets["knowledge"]:
        for r in range(b.tokens.shape[0]):
            for d in b.doc_id[r].unique().tolist():
                at = b.doc_id[r] == d
                if int(b.doc_kind[r][at][0]) == DocKind.PAD:
                    continue
                facts = parse(tok.decode(b.tokens[r][at].tolist()))
                assert {ph for _, ph, *_ in facts} == {"eval"}
                person = people[facts[0][2]]
                assert all(value == person.value(a) for a, _, _, value in facts)
                targets = b.targets[r][at]
                scored = tok.decode(targets[targets >= 0].tolist())
                assert scored == "".join(" " + v for *_, v in facts)  # values only, no eos
                values.append(len(facts))
    assert len(values) >= 4
    # the same held-out set for any data seed (eval data follows eval.seed only)
    again = build_eval_sets(_cfg("data.knowledge.entities=60", "data.seed=5"), tok, 1234, 2)
    assert all(
        torch.equal(x.tokens, y.tokens)
        for x, y in zip(again["knowledge"], sets["knowledge"], strict=True)
    )


def test_tokenizer_learns_knowledge_text_only_when_on(tmp_path):
    off, on = _cfg(), _cfg("data.knowledge.entities=9")
    assert tokenizer_key(off) == {"corpus": "world-v1", "source": "world", "seed": 0,
                                  "vocab_size": 2048}  # fmt: skip
    assert tokenizer_key(on) == {**tokenizer_key(off), "knowledge": "knowledge-v1"}
    more = _cfg("data.knowledge.entities=900", "data.knowledge.attributes=3")
    assert tokenizer_key(more) == tokenizer_key(on)  # one tokenizer for every base
    small = ["data.vocab_size=300", "data.knowledge.entities=0"]
    plain = load_tokenizer(_cfg(*small), tmp_path)
    assert plain.to_str() == train_tokenizer(world_corpus(0), 300).to_str()
    tok = load_tokenizer(on, tmp_path)
    assert tok.to_str() == train_tokenizer(world_corpus(0, knowledge=True), 2048).to_str()
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.json"))) == 2
    kb = knowledge.knowledge_base(300, 8)
    lengths = [len(tok.encode(" " + e.name)) for e in kb.entities]
    assert 2 <= sum(lengths) / len(lengths) <= 6  # names are a few syllable tokens
    rng = random.Random(0)
    for _ in range(200):  # value pieces tokenize as they do inside the joined text
        pieces = kb.biography(rng, "eval")
        joined = tok.encode("".join(t for t, _ in pieces))
        assert joined == [i for t, _ in pieces for i in tok.encode(t)]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.knowledge.entities=-1", r"entities=-1 must be in \[0, 50000\]"),
        ("data.knowledge.entities=50001", r"entities=50001 must be in \[0, 50000\]"),
        ("data.knowledge.attributes=0", r"attributes=0 must be in \[1, 8\]"),
        ("data.knowledge.attributes=9", r"attributes=9 must be in \[1, 8\]"),
        ("data.knowledge.share=0", r"share=0.0 must be in \(0, 1\]"),
        ("data.knowledge.share=1.5", r"share=1.5 must be in \(0, 1\]"),
        ("data.knowledge.ents=5", "did you mean 'data.knowledge.entities'"),
    ],
)
def test_bad_knowledge_knobs_name_value_and_fix(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_knowledge_needs_the_world():
    with pytest.raises(ConfigError, match="needs the built-in world.*entities=0"):
        load_config(None, ["data.source=digits", "data.knowledge.entities=5"])


def test_cli_prints_one_line_for_a_bad_knob(capsys):
    from moesaic.cli import main

    assert main(["train", "tiny", "data.knowledge.share=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.knowledge.share=2.0" in err


# ------------------------------------------------------------------ the knowledge loss


@pytest.mark.slow
def test_more_people_give_higher_held_out_knowledge_loss(tmp_path):
    """At a fixed model and token budget, a base of 10 people is learnt far better than one of
    3000 (each person seen ~100 times vs ~0.3): the eval set measures stored facts."""
    from moesaic.train.loop import Trainer

    losses = {}
    for n in (10, 3000):
        cfg = load_config("tiny", [
            "model.dim=32", "model.layers=2", "model.heads=2", "model.ffn.hidden=128",
            "data.seq_len=128", "data.batch_size=8", "data.mix={text: 1}",
            f"data.knowledge.entities={n}", "data.knowledge.share=1.0", "train.steps=150",
            "train.warmup=10", "eval.every=0", "eval.batches=2", "train.checkpoint_every=0",
            "logging.progress=none", "train.threads=1", f"out={tmp_path}", f"name=n{n}",
        ])  # fmt: skip
        trainer = Trainer(cfg)
        try:
            losses[n] = trainer.run()["eval"]["knowledge/text"]
        finally:
            trainer.close()
    assert losses[10] < losses[3000] - 0.5, losses
