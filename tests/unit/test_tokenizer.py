"""Our host tokenizers against transformers' CLIPTokenizer read from a diffusers-style folder.

The reference folders (``tokenizer/``, ``tokenizer_2/``) are written here by a small independent
conversion of OpenAI's BPE file (vocab.json + merges.txt, as in the ``openai/clip-vit-large-patch14``
repository); ``tokenizer_2`` pads with ``"!"`` (id 0) as SDXL's. Full 77-id rows are compared.
"""

import gzip
import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from gm.errors import ConfigError
from gm.modules.embedders.tokenizer import BPE_PATH, EOT_TOKEN, OPEN_CLIP_PAD_TOKEN, CLIPTextTokenizer

PROMPTS = [
    "a photo of sks dog",
    "",
    "A PHOTO OF SKS DOG IN THE SNOW",
    "  lots   of\twhite \n space  ",
    "a sks dog, wearing a red hat; with sunglasses!!! (cinematic) [4k] {hdr}",
    "it's the dog's bowl, isn't it? they're here, we'll see, I'd say, you've won",
    "café naïve résumé Zürich façade",
    "一只可爱的小狗在草地上奔跑",
    "東京タワーの夜景、とても綺麗",
    "강아지 사진",
    "a dog 🐶 with emoji 🎉🎉 and ❤️",
    "numbers 1234567890 and 3.14159, 1/2, 50%",
    "email@example.com https://example.com/path?q=1&r=2",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "a photo of sks dog " * 20,  # longer than 77 tokens: truncated, EOT kept last
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ÀÉÎÕÜ upper accents and ß",
    "tabs\tand\r\nwindows newlines",
    "Ω≈ç√∫˜µ≤≥÷ math symbols ∑∏",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "---___...!!!???",
    "Привет, собака!",
]


def _byte_chars():
    """OpenAI's byte-level alphabet: printable bytes as themselves, then the rest from U+0100."""
    keep = sorted(set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256)))
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def _write_folder(path, pad_token):
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        merge_lines = f.read().split("\n")[1:1 + 49152 - 256 - 2]
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merge_lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_tokenizers")
    return {"tokenizer": _write_folder(root / "tokenizer", EOT_TOKEN),
            "tokenizer_2": _write_folder(root / "tokenizer_2", OPEN_CLIP_PAD_TOKEN)}


def _reference_ids(folder, prompts):
    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert len(tok) == 49408 and tok.model_max_length == 77
    return np.asarray(tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


@pytest.mark.parametrize("name,pad_token,pad_id",
                         [("tokenizer", EOT_TOKEN, 49407), ("tokenizer_2", OPEN_CLIP_PAD_TOKEN, 0)])
def test_ids_match_reference(folders, name, pad_token, pad_id):
    expected = _reference_ids(folders[name], PROMPTS)
    built_in = CLIPTextTokenizer(pad_token)(PROMPTS)
    from_folder = CLIPTextTokenizer(pad_token, folder=folders[name])(PROMPTS)
    assert built_in.dtype == np.int32 and built_in.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(built_in, expected)
    np.testing.assert_array_equal(from_folder, expected)
    # every row: SOT first, text, EOT, then only padding (a prompt spelling out the special
    # tokens gets their ids, in the reference too)
    assert (built_in[:, 0] == 49406).all()
    for prompt, row in zip(PROMPTS, built_in):
        eot = int(np.argmax(row == 49407))
        assert (row[eot + 1:] == pad_id).all() or "<|endoftext|>" in prompt
    # the pooled output picks argmax(ids): it must be the EOT with either padding
    assert (np.argmax(built_in, axis=-1) == np.argmax(built_in == 49407, axis=-1)).all()


def test_known_ids_and_edge_cases():
    tok = CLIPTextTokenizer()
    ids = tok("a photo of sks dog")
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert (ids[0, 7:] == 49407).all()
    open_clip_ids = CLIPTextTokenizer(OPEN_CLIP_PAD_TOKEN)("a photo of sks dog")
    assert open_clip_ids[0, :7].tolist() == ids[0, :7].tolist() and (open_clip_ids[0, 7:] == 0).all()
    empty = tok([""])
    assert empty[0, :2].tolist() == [49406, 49407]
    long = tok(["dog " * 200])
    assert long[0, 0] == 49406 and long[0, 76] == 49407 and (long[0, 1:76] == long[0, 1]).all()
    # case and whitespace are normalised away
    np.testing.assert_array_equal(tok("A  Photo\tOF sks DOG"), ids)


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="prompts must be strings"):
        CLIPTextTokenizer()(["ok", None])
    with pytest.raises(ConfigError, match="tokenizer folder"):
        CLIPTextTokenizer(folder=tmp_path / "missing")(["a"])
