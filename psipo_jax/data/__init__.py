"""Preference data: TFDS builders, tokenisers and Grain pipelines.

Entry points:
  make_preference_iterator(config, split)  batches for training / evaluation
  get_input_config()                       the `input` config section, documented
  make_tokenizer(spec)                     byte / SentencePiece / Hugging Face
  python -m psipo_jax.data.inspect --config=...   sizes, lengths, examples
"""

from psipo_jax.data.config import get_input_config
from psipo_jax.data.config import parse_input_config
from psipo_jax.data.pipeline import make_preference_iterator
from psipo_jax.data.pipeline import PreferenceIterator
from psipo_jax.data.readers import DataError
from psipo_jax.data.tokenizers import make_tokenizer
from psipo_jax.data.tokenizers import Tokenizer

__all__ = [
  "DataError",
  "PreferenceIterator",
  "Tokenizer",
  "get_input_config",
  "make_preference_iterator",
  "make_tokenizer",
  "parse_input_config",
]
