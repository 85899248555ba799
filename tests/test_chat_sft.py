"""Chat template, SFT examples and packing, conversation and preference-pair readers."""

import json

import numpy as np
import pytest

from jaxlm.data import chat, conversations
from jaxlm.data.sft import make_sft_iterator, tokenize_conversations
from jaxlm.data.tokenizer import train_sentencepiece
from jaxlm.run.config import base_config
from tests.data_fixtures import synthetic_documents

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "Twelve, def f(x): return 3 * x"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(synthetic_documents(300, seed=5), str(d / "chat.model"),
                               vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"])


def _runs(mask):
    """[start, end) of the runs of 1s in mask."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_render_messages_is_chatml():
    text = chat.render_messages(CONVERSATION[1:3], add_generation_prompt=True)
    assert text == ("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\nIt is 4.<|im_end|>\n<|im_start|>assistant\n")
    system = chat.ChatTemplate(system_prompt="Be kind.")
    assert chat.render_messages(CONVERSATION[1:2], template=system).startswith(
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")


def test_sft_mask_is_exactly_the_assistant_tokens(tokenizer):
    ids, mask = chat.render_tokens(tokenizer, CONVERSATION)
    end_id = tokenizer.piece_to_id("<|im_end|>")
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(answers)
    for (start, stop), answer in zip(runs, answers):
        assert ids[start:stop].tolist() == tokenizer.encode(answer) + [end_id]
    # Nothing else is trained: the unmasked tokens are the rendering minus the answers.
    assert mask.sum() == sum(len(tokenizer.encode(a)) + 1 for a in answers)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids[1:]) == chat.render_messages(CONVERSATION)
    _, all_mask = chat.render_tokens(tokenizer, CONVERSATION, loss_on="all")
    assert all_mask[0] == 0 and all_mask[1:].all()


def test_prompt_ids_are_a_prefix_of_the_conversation(tokenizer):
    ids, mask = chat.render_tokens(tokenizer, CONVERSATION[:3])
    prompt = chat.prompt_ids(tokenizer, CONVERSATION[:2])
    answer = chat.response_ids(tokenizer, CONVERSATION[2]["content"])
    assert ids[:len(prompt) + len(answer)].tolist() == prompt.tolist() + answer.tolist()
    assert mask[len(prompt):len(prompt) + len(answer)].all() and not mask[:len(prompt)].any()
    assert tokenizer.decode(prompt[1:]) == chat.render_messages(CONVERSATION[:2],
                                                                add_generation_prompt=True)


def test_missing_special_tokens_name_the_config_key(tokenizer, tmp_path):
    other = train_sentencepiece(synthetic_documents(100, seed=1), str(tmp_path / "o.model"),
                                vocab_size=320)
    with pytest.raises(ValueError, match="data.special_tokens"):
        chat.render_tokens(other, CONVERSATION)
    c = base_config()
    c.stage, c.data.special_tokens = "sft", "<|user|>"
    from jaxlm.run.config import validate
    with pytest.raises(ValueError, match="config key data.special_tokens"):
        validate(c)


def test_truncation_policy_is_counted(tokenizer):
    short = CONVERSATION[1:3]
    convs = [short, CONVERSATION[1:], [{"role": "user", "content": "x" * 200},
                                   {"role": "assistant", "content": "y"}]]
    seq_len = len(chat.render_tokens(tokenizer, short)[0]) + 2
    kept, counts = tokenize_conversations(convs, tokenizer, template=chat.CHATML,
                                          seq_len=seq_len, loss_on="assistant",
                                          truncation="truncate")
    # The long one is cut (it keeps its first answer); the last one loses its answer.
    assert (counts.truncated, counts.dropped_no_target, counts.examples) == (2, 1, 2)
    assert all(len(k["inputs"]) <= seq_len for k in kept)
    _, counts = tokenize_conversations(convs, tokenizer, template=chat.CHATML, seq_len=seq_len,
                                       loss_on="assistant", truncation="drop")
    assert (counts.dropped_too_long, counts.examples) == (2, 1)


def test_packed_rows_keep_conversations_apart(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    convs = []
    for i in range(40):
        turns = []
        for t in range(1 + i % 3):
            turns += [{"role": "user", "content": f"q{i}.{t} " * int(rng.integers(1, 4))},
                      {"role": "assistant", "content": f"a{i}.{t}"}]
        convs.append(turns)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    c = base_config()
    c.stage, c.sft.paths, c.data.seq_len, c.data.eval_fraction = "sft", str(path), 128, 0.1
    it = make_sft_iterator(c, tokenizer, split="train", batch_size=4)
    rendered = {tuple(chat.render_tokens(tokenizer, m)[0]): chat.render_tokens(tokenizer, m)[1]
                for m in convs}
    assert max(map(len, rendered)) <= 129  # none is truncated
    segments = 0
    for _ in range(3):
        batch = next(it)
        assert batch["inputs"].shape == (4, 128)
        for r in range(4):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                where = seg == s
                ids = np.concatenate([batch["inputs"][r][where], batch["targets"][r][where][-1:]])
                assert tuple(ids) in rendered  # a whole conversation, not a piece
                np.testing.assert_array_equal(batch["loss_mask"][r][where],
                                              rendered[tuple(ids)][1:])
                np.testing.assert_array_equal(batch["positions"][r][where],
                                              np.arange(where.sum()))
                segments += 1
            assert not batch["loss_mask"][r][seg == 0].any()
    assert segments > 12  # several conversations per row


def test_chatterbot_corpus_and_demonstration_pairs():
    convs = conversations.read_conversations("chatterbot", "sft.paths")
    assert len(convs) > 2000
    assert all(m["role"] == ("user" if i % 2 == 0 else "assistant")
               for conv in convs for i, m in enumerate(conv))
    assert any(len(conv) > 2 for conv in convs)  # multi-turn dialogs too
    pairs = conversations.read_pairs("chatterbot", "dpo.paths")
    assert len(pairs) == sum(len(conv) // 2 for conv in convs)
    assert all(p.chosen != p.rejected and p.prompt[-1]["role"] == "user" for p in pairs)


def test_preference_layouts_normalise_to_one_pair():
    want = conversations.Pair(prompt=[{"role": "user", "content": "Hi?"}], chosen="Hello!",
                              rejected="Go away.")
    records = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Hi?",  # UltraFeedback
         "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant",
                                                          "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant",
                                                            "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant",  # HH messages
                                                          "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant",
                                                            "content": "Go away."}]},
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!",  # HH-RLHF raw text
         "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    ]
    for i, record in enumerate(records):
        assert conversations.parse_pair(record, f"r{i}") == want, i
    with pytest.raises(ValueError, match="different conversations"):
        conversations.parse_pair({"chosen": "\n\nHuman: A\n\nAssistant: x",
                                  "rejected": "\n\nHuman: B\n\nAssistant: y"}, "bad")
