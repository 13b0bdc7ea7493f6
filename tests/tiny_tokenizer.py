"""The small byte-level BPE tokenizer every factory checkpoint ships (trained on a fixed built-in text).

onnxruntime-genai must load it and encode/decode exactly like `tokenizers` (tests/test_factory.py checks both).
"""

from __future__ import annotations

import json
from pathlib import Path

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
_SPECIALS = [UNK, BOS, EOS, PAD]  # trained first, so their ids are 0..3
TOKENIZER_VOCAB = 384
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm afternoon sun.
A model turns numbers into words, and words into numbers again; the tokenizer is where that journey starts.
Once upon a time there was a little village by the river. Every morning the baker opened his shop,
the children ran to school, and the old fisherman pushed his boat into the cold, clear water.
Hello! How are you today? I am fine, thank you. What is your name? My name is Ada, and I like to read.
Weather report: cloudy in the north, sunny in the south, with light rain expected over the mountains tonight.
To make bread, mix flour, water, salt and yeast. Let the dough rest for one hour, then bake it for forty minutes.
The history of computing is a story of people who wanted machines to help them think faster and remember more.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in many texts, as do dates like March 5 and July 21.
She said that the meeting would start at nine o'clock, but nobody arrived before half past nine.
In the garden there are roses, tulips, apple trees and a tall green hedge that hides the road from view.
Questions and answers: Why is the sky blue? Because air scatters blue light more than red light.
Good morning, good evening, good night. Please, thank you, sorry, excuse me, welcome back, see you soon.
The train left the station slowly, then faster and faster, until the houses outside became a grey blur.
"""


def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens in every factory tokenizer (fixed by training order)."""
    return {tok: i for i, tok in enumerate(_SPECIALS)}


def make_tokenizer(out_dir: Path, model_max_length: int = 256) -> None:
    """Train a small byte-level BPE on the built-in text and save it the way real checkpoints ship it.

    Byte-level BPE never needs ``<unk>`` (every byte has a token), so any text round-trips.  The files are
    tokenizer.json, tokenizer_config.json (with ``chat_template`` and a tokenizer_class that older readers
    and onnxruntime-genai know), chat_template.jinja and special_tokens_map.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=list(_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["model_max_length"] = model_max_length
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2, sort_keys=True) + "\n")
