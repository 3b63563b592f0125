"""Data: the embedded default corpus, tokenizers, tensorstore token streams and the grain pipeline.

``prepare_data(cfg.data, vocab_size=...)`` is the entry point; see ``pipeline`` for the batch format
and ``mixture`` for the training stream (domain weights that may change mid-run).
``corpus_provenance(cfg.data)`` says what a run trained on (Python version, content sha256).
"""

from moejax.data.corpus import corpus_provenance, load_documents, split_documents
from moejax.data.corpus_build import EMBEDDED_DOMAINS, FINE_DOMAINS, embedded_domain_groups
from moejax.data.mixture import DomainStream, Mixture, MixtureIterator
from moejax.data.pipeline import Data, make_row, prepare_data
from moejax.data.store import TokenStore
from moejax.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["BPETokenizer", "ByteTokenizer", "Data", "DomainStream", "EMBEDDED_DOMAINS", "Mixture",
           "MixtureIterator", "TokenStore", "Tokenizer",
           "corpus_provenance", "load_documents", "load_tokenizer", "make_row", "prepare_data",
           "split_documents"]
__all__ += ["FINE_DOMAINS", "embedded_domain_groups"]
