"""Where text comes from: the embedded Python docs, a URL, local text files, or a Hugging Face dataset."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from mlxgpt.digest import file_sha256
from mlxgpt.errors import UserError
from mlxgpt.hub import offline_unless_reachable
from mlxgpt.log import stderr_unless_failing

FILE_BUILDERS = "parquet|json|csv|text"  # datasets' builders of local data files


def read_text(cfg) -> tuple[str, str]:
    """A single-text corpus (pydoc, url or text) and the sha256 of its content."""
    if cfg.source == "pydoc":
        text = pydoc_text()
        return text, hashlib.sha256(text.encode()).hexdigest()
    if cfg.source == "url":
        path, sha256 = url_file(cfg)
        return read_utf8(path), sha256
    if cfg.source == "text":
        text = "".join(_with_newline(read_utf8(p)) for p in text_files(cfg.path))
        if not text.strip():
            raise UserError(f"data.path={cfg.path} holds only empty files; point it at a non-empty text file")
        return text, hashlib.sha256(text.encode()).hexdigest()
    raise UserError(f"unknown data.source={cfg.source!r}; use one of pydoc, url, text, hf")


def pydoc_text() -> str:
    """The Python documentation topics that ship with every CPython (pydoc_data), about 0.5 MB."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module; choose another dataset, e.g. data=shakespeare_char") from None
    return "\n\n".join(topics[name] for name in sorted(topics))


def url_file(cfg) -> tuple[Path, str]:
    """The local file for data.url (downloaded once into the cache, or data.path) and its verified sha256."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise UserError(f"data.path={cfg.path} does not exist; fix the path or unset it to download data.url")
    elif cfg.url:
        name = Path(urllib.parse.urlparse(cfg.url).path).name or "download"
        path = Path(cfg.cache_dir).expanduser() / "downloads" / f"{hashlib.sha256(cfg.url.encode()).hexdigest()[:12]}-{name}"
        if not path.is_file():
            _download(cfg.url, path, cfg.sha256)
    else:
        raise UserError("data.source=url needs data.url (or data.path to a local copy)")
    sha256 = file_sha256(path)
    if cfg.sha256 and sha256 != cfg.sha256.lower():
        if cfg.path:  # the user's own file: never advise deleting it
            raise UserError(f"data.path={cfg.path} is not the {cfg.name} file (sha256 {sha256}, expected data.sha256={cfg.sha256}); "
                            f"for other text use data=text data.path={cfg.path}, or data.sha256=null to skip the check")
        raise UserError(f"the downloaded copy {path} has sha256 {sha256}, expected data.sha256={cfg.sha256}; delete it to download it again, or fix data.sha256")
    return path, sha256


def check_source(cfg) -> None:
    """UserError when the local files a data config names are not there (data=text), before a run starts."""
    if cfg.source == "text":
        text_files(cfg.path)


def text_files(pattern: str | None) -> list[Path]:
    """The files named by data.path (a file, a directory or a glob pattern), sorted; UserError if none."""
    if not pattern:
        raise UserError("data.source=text needs data.path (a text file, a directory or a glob pattern)")
    found = _expand(pattern)
    if not found:
        raise UserError(f"data.path={pattern} matches no file; point it at a text file, a directory or a glob like 'books/*.txt'")
    return sorted(found)


def load_documents(cfg):
    """The documents of a Hugging Face dataset: a datasets.Dataset, or an IterableDataset when data.streaming."""
    if not cfg.path and cfg.hf_path and Path(cfg.hf_path).expanduser().is_file():
        raise UserError(f"data.hf_path={cfg.hf_path} is a file, not a dataset: name its format and the file, "
                        f"data.hf_path={FILE_BUILDERS} data.data_files={cfg.hf_path}")
    if not cfg.path:
        offline_unless_reachable()
    import datasets

    try:
        with _datasets_output_unless_failing():
            if cfg.path:
                ds = datasets.load_from_disk(str(Path(cfg.path).expanduser()))
            else:
                ds = datasets.load_dataset(
                    cfg.hf_path, cfg.hf_name, revision=cfg.hf_revision, split=cfg.hf_split,
                    data_files=plain(cfg.data_files), streaming=cfg.streaming,
                    num_proc=None if cfg.streaming else (cfg.num_proc or os.cpu_count()),
                )
    except Exception as e:  # hub, network, file and format errors all end here
        raise _not_loaded(cfg, e) from e
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise UserError(f"data.path={cfg.path} has no split {cfg.hf_split!r} (splits: {list(ds)}); set data.hf_split")
        ds = ds[cfg.hf_split]
    if cfg.path and cfg.streaming:
        ds = ds.to_iterable_dataset()
    columns = ds.column_names
    if columns is not None and cfg.text_column not in columns:
        raise UserError(f"the dataset has no column {cfg.text_column!r} (columns: {columns}); set data.text_column")
    _check_text_column(ds.features, cfg.text_column)
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if cfg.streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


@contextlib.contextmanager
def _datasets_output_unless_failing():
    """datasets' log messages, warnings and progress bars of a load on the console once it has taken 2 s or loaded,
    not when it fails sooner (the one-line error gives the cause); its messages go to the root logger's handlers only
    (train.log keeps them; its own handler would print each twice)."""
    logger = logging.getLogger("datasets")
    handlers, logger.handlers = logger.handlers, []
    try:
        with stderr_unless_failing():
            yield
    finally:
        logger.handlers = handlers


def _not_loaded(cfg, error: Exception) -> UserError:
    """The one-line error for a dataset that does not load: its cause, and the fix where the data comes from (a saved
    dataset, local files, the hub)."""
    reason = _root_cause(error)
    if cfg.path:
        return UserError(f"data.path={cfg.path} is not a directory that datasets' save_to_disk wrote ({reason}); for "
                         f"data files use data.hf_path={FILE_BUILDERS} data.data_files='<files>'")
    where = (f"data.hf_path={cfg.hf_path} hf_name={cfg.hf_name} hf_revision={cfg.hf_revision} "
             f"data_files={plain(cfg.data_files)} split {cfg.hf_split}")
    local_files = [f for f in _flatten(plain(cfg.data_files)) if "://" not in f]
    if local_files or (cfg.hf_path and Path(cfg.hf_path).expanduser().is_dir()):
        return UserError(f"cannot load the dataset {where} ({reason}); check these settings and the files")
    return UserError(f"cannot load the dataset {where} ({reason}); check these settings and the network, or use a "
                     f"local copy: data.path=<datasets.save_to_disk dir> or data.hf_path=parquet "
                     f"data.data_files='<dir>/*.parquet'")


def _root_cause(error: BaseException) -> str:
    """'Type: message' of what made a load fail, in one line (of a long message, its first and last lines): the cause
    of datasets' DatasetGenerationError ("An error occurred..."), also one a worker process raised (a RemoteTraceback,
    whose text is the traceback: its first exception, after its last indented line)."""
    while type(error).__name__ == "DatasetGenerationError" and error.__cause__:
        error = error.__cause__
    lines = f"{type(error).__name__}: {error}".splitlines()
    if type(error).__name__ == "RemoteTraceback":
        lines = str(error).split("The above exception was the direct cause")[0].splitlines()
        lines = lines[max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1) + 1:]
    lines = [line.strip()[:200] for line in lines if line.strip() and line.strip() != '"""']
    return " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(error).__name__


def _check_text_column(features, column: str) -> None:
    """UserError when the dataset's features say the text column does not hold strings."""
    def is_text(feature) -> bool:
        return getattr(feature, "dtype", None) in ("string", "large_string")

    if features is None or is_text(features[column]):
        return
    kind = getattr(features[column], "dtype", type(features[column]).__name__)
    raise UserError(f"data.text_column={column} holds {kind} values, not text; set data.text_column to a string column "
                    f"(string columns: {[name for name, f in features.items() if is_text(f)]})")


def hf_identity(cfg) -> dict:
    """What determines a Hugging Face corpus: its ids, and the size and mtime of local files it reads."""
    local = [str(Path(cfg.path).expanduser())] if cfg.path else [f for f in _flatten(plain(cfg.data_files)) if "://" not in f]
    if not cfg.path and cfg.hf_path and Path(cfg.hf_path).expanduser().exists():  # a local folder or file, not a hub id
        local.append(cfg.hf_path)
    files = sorted({p for pattern in local for p in _expand(pattern)})
    return {
        "source": "hf", "hf_path": cfg.hf_path, "hf_name": cfg.hf_name, "hf_revision": cfg.hf_revision,
        "hf_split": cfg.hf_split, "data_files": plain(cfg.data_files), "text_column": cfg.text_column,
        "local_files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def unwritable(directory: Path, error: OSError) -> UserError:
    """The one-line error for a data directory that cannot be written (read-only, full, not a directory)."""
    return UserError(f"cannot write to {directory} ({error}); free some space, or set paths.data_dir=<writable dir> "
                     "(or MLXGPT_DATA_DIR)")


def plain(value):
    """A Hydra/OmegaConf container as plain Python lists and dicts (other values unchanged)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _download(url: str, path: Path, sha256: str | None) -> None:
    """Download url to path with a progress bar; verify sha256 before the file gets its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise unwritable(path.parent, e) from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if sha256 and digest.hexdigest() != sha256.lower():
            raise UserError(f"download of {url} has sha256 {digest.hexdigest()}, expected data.sha256={sha256}; retry, or fix data.sha256")
        os.replace(tmp, path)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise UserError(f"cannot download {url} ({e}); check the network, or download it yourself and set data.path=<file>") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_utf8(path: Path, fix: str = "leave it out of data.path") -> str:
    """The file's text: UTF-8 without a byte-order mark (Windows editors write one), newlines as \\n; a UserError with
    the `fix` when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 or {fix}") from None


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def _flatten(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _flatten(v)]
    return [f for v in data_files for f in _flatten(v)]


def _expand(pattern: str) -> list[Path]:
    """The files named by a path, a directory or a glob, without hidden files or folders (.git/) below it."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    # glob's * and ** skip dot names already; only a pattern part that starts with a dot (.git/*) reaches them
    return [Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p)]
