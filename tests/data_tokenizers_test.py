"""Tokenizers: built-in bytes, SentencePiece and Hugging Face files, one interface."""

import io
import json
import sys

import numpy as np
import pytest

from psipo_jax.data import tokenizers

CORPUS = [
  "Hello world, this is a small corpus.",
  "The quick brown fox jumps over the lazy dog.",
  "Which answer do you prefer?",
] * 30


def test_byte_tokenizer_round_trip_and_specials():
  tok = tokenizers.make_tokenizer("byte")
  text = "naïve ∑ 🙂 \n\t"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
  assert tok.decode(ids) == text
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.decode(np.r_[tok.bos_id, ids, tok.eos_id, tok.pad_id]) == text


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=model,
    vocab_size=40,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    unk_id=0,
    minloglevel=2,
  )
  path = tmp_path_factory.mktemp("sp") / "tok.model"
  path.write_bytes(model.getvalue())
  return str(path)


def test_sentencepiece(sentencepiece_model):
  tok = tokenizers.make_tokenizer(f"sentencepiece:{sentencepiece_model}")
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 40)
  ids = tok.encode("the quick fox")
  assert ids.dtype == np.int32 and tok.special_ids.isdisjoint(ids.tolist())
  assert tok.decode(np.r_[tok.bos_id, ids, tok.eos_id]) == "the quick fox"
  # A named special token overrides the model's own; an unknown one is an error.
  assert (
    tokenizers.make_tokenizer(
      f"sentencepiece:{sentencepiece_model}", pad_token="</s>"
    ).pad_id
    == 2
  )
  with pytest.raises(ValueError, match="input.pad_token='<nope>'"):
    tokenizers.make_tokenizer(
      f"sentencepiece:{sentencepiece_model}", pad_token="<nope>"
    )


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
  tk = pytest.importorskip("tokenizers")
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
    initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS, trainer)
  directory = tmp_path_factory.mktemp("hf")
  tok.save(str(directory / "tokenizer.json"))
  return directory


def test_huggingface_reads_specials_from_tokenizer_config(
  hf_tokenizer_dir, tmp_path
):
  path = tmp_path / "tokenizer.json"
  path.write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
  bare = tokenizers.make_tokenizer(f"hf:{path}", eos_token="</s>")
  assert (bare.bos_id, bare.eos_id, bare.pad_id) == (
    None,
    2,
    2,
  )  # no pad: EOS pads
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
        "pad_token": "<pad>",
      }
    )
  )
  tok = tokenizers.make_tokenizer(f"huggingface:{path}")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  text = "The lazy fox prefers é."
  ids = tok.encode(text)
  assert tok.special_ids.isdisjoint(ids.tolist())
  assert tok.decode(np.r_[tok.bos_id, ids, tok.eos_id, tok.pad_id]) == text
  assert tok.fingerprint != bare.fingerprint


def test_huggingface_without_eos_or_pad_asks_for_pad_token(hf_tokenizer_dir):
  with pytest.raises(ValueError, match="input.pad_token"):
    tokenizers.make_tokenizer(f"hf:{hf_tokenizer_dir / 'tokenizer.json'}")


def test_bad_specs_name_the_config_key(tmp_path):
  with pytest.raises(ValueError, match="input.tokenizer='bpe'"):
    tokenizers.make_tokenizer("bpe")
  with pytest.raises(FileNotFoundError, match="input.tokenizer: no such file"):
    tokenizers.make_tokenizer(f"sentencepiece:{tmp_path / 'missing.model'}")


@pytest.mark.parametrize(
  "module, spec",
  [("sentencepiece", "sentencepiece:x.model"), ("tokenizers", "hf:x.json")],
)
def test_missing_optional_package_says_what_to_install(
  monkeypatch, module, spec
):
  monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
  with pytest.raises(ImportError, match=f"pip install {module}"):
    tokenizers.make_tokenizer(spec)
