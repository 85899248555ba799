"""Hugging Face tokenizer directories built locally (no download): a byte-level BPE
`tokenizer.json` trained on synthetic text, with a Llama-3-style or a ChatML (Qwen2-style) chat
template in `tokenizer_config.json`."""

from __future__ import annotations

import json
import os

from tests.data_fixtures import synthetic_documents

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}\n")
STYLES = {
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE),
    "chatml": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   bos=None, eos="<|im_end|>", template=CHATML_TEMPLATE),
}
MIXED_TEXT = ("def f(x):\n        return x**2  # über-größe ≥ 5 ✓\n\n\n\tTab\there   "
              "spaces   end 日本語のテキスト 😀 <|eot_id|> 12345 x<|im_end|>y")


def write_hf_tokenizer(directory: str, style: str = "llama3", vocab_size: int = 400) -> str:
    """Writes tokenizer.json + tokenizer_config.json into `directory`; returns tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(synthetic_documents(200, seed=7), trainer)
    if spec["bos"]:
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], bos_id)])
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"],
              "eos_token": spec["eos"], "chat_template": spec["template"],
              "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return path
