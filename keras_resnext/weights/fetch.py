"""What `weights=` names, as a local file: a path, a weights name ("imagenet",
"IMAGENET1K_V2"), an http(s):// or file:// URL, or hf://OWNER/REPO.

Downloads go through `keras.utils.get_file` into Keras' cache
($KERAS_HOME, else ~/.keras) under `keras_resnext/<host>/<URL path>`, once:
a cached file is used without the network. A file whose name carries a
torchvision-style hash prefix (`resnext50_32x4d-1a0047aa.pth`) must have a
sha256 that starts with it, checked when it is downloaded, as torch.hub does.
"""

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import urllib.parse
import urllib.request
import uuid
import zipfile

import keras

from keras_resnext.transforms import EvalTransform
from keras_resnext.weights import catalog, readers

CACHE_SUBDIR = "keras_resnext"
HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"

# torch.hub's rule: `<name>-<sha256 prefix>.<extension>`.
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_HF_REPO = re.compile(r"hf://(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+)/?")


class WeightsUnavailable(OSError):
    """A weights file that could not be downloaded and is not cached; the
    message names the URL and the path to place the file at by hand."""


class HashMismatch(ValueError):
    """A downloaded file whose sha256 doesn't start with the prefix in its name."""


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where `weights=` points: a local file, or a URL and the file it is cached as."""

    weights: str  # as given
    path: str  # the local file, or where the download is cached
    url: str = None  # None for a local file
    eval_transform: EvalTransform = None  # what the weights were evaluated with, if published

    def local_path(self):
        """The local file, downloaded first if it is a URL not yet cached."""
        if self.url is not None:
            if os.path.isfile(self.path):
                # Checked on every use, not only after a download: the offline
                # message tells users to place files here by hand.
                check_cached_hash_prefix(self.path, self.url)
            else:
                download(self.url, self.path)
        return self.path


def resolve(weights, architecture):
    """The `WeightsSource` that `weights` names for `architecture` (a preset
    name such as "resnext50_32x4d", see `catalog.architecture_name`, or None).

    Downloads nothing but an hf:// repo's small config.json; raises, in one
    line, for names that `architecture` has no weights under.
    """
    if not isinstance(weights, str):
        return WeightsSource(weights, weights)  # a PathLike, or a TypeError for readers
    if _URL.match(weights):
        return _from_url(weights, architecture)
    if catalog.is_weights_name(weights):
        entry = catalog.named_weights(weights, architecture)
        return WeightsSource(weights, cache_path(entry.url), entry.url, entry.eval_transform)
    if not os.path.exists(weights) and _looks_like_a_name(weights):
        raise ValueError(
            f"Unknown weights {weights!r}: use one of {', '.join(catalog.weight_names())} "
            f"(case-insensitive), a weights file, an http(s):// or file:// URL, or "
            f"hf://OWNER/REPO."
        )
    return WeightsSource(weights, weights)


def is_path(weights):
    """Whether `weights` is a plain file path: not a weights name, nor a URL."""
    return not (isinstance(weights, str)
                and (_URL.match(weights) or catalog.is_weights_name(weights)))


def _looks_like_a_name(weights):
    """A bare word: no folder, no extension (a missing file has one or the other)."""
    return bool(weights) and not any(mark in weights for mark in (os.sep, "/", "."))


def _from_url(url, architecture):
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return WeightsSource(url, urllib.request.url2pathname(parts.path))
    if scheme in ("http", "https"):
        return WeightsSource(url, cache_path(url), url)
    if scheme == "hf":
        return _from_hf(url, architecture)
    raise ValueError(
        f"weights={url!r}: unsupported URL scheme {parts.scheme!r}; use http://, https://, "
        f"file:// or hf://OWNER/REPO."
    )


def _from_hf(handle, architecture):
    """An hf://OWNER/REPO: its model.safetensors, evaluated as its config.json's
    timm `pretrained_cfg` says."""
    match = _HF_REPO.fullmatch(handle)
    if match is None:
        raise ValueError(f"weights={handle!r}: expected hf://OWNER/REPO.")
    repo_url = f"{catalog.hf_base_url()}{match['owner']}/{match['repo']}/resolve/main/"
    config_url = repo_url + HF_CONFIG_FILE
    config_path = WeightsSource(handle, cache_path(config_url), config_url).local_path()
    try:
        config = _read_json(config_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not read {config_path} ({config_url}): {error}") from None
    held = config.get("architecture")
    if architecture and isinstance(held, str) and held != architecture:
        raise ValueError(
            f"{handle} holds timm's {held}, which doesn't fit a {architecture}; build a "
            f"{held} to load it."
        )
    weights_url = repo_url + HF_WEIGHTS_FILE
    return WeightsSource(handle, cache_path(weights_url), weights_url,
                         _timm_eval_transform(config, handle))


def _read_json(path):
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    return config


def _timm_eval_transform(config, handle):
    """The eval transform of timm's `pretrained_cfg`; None where the config
    isn't timm's (no input size)."""
    pretrained = config.get("pretrained_cfg", config)
    if not isinstance(pretrained, dict) or "input_size" not in pretrained:
        return None
    try:
        return EvalTransform.from_timm_config(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{handle}'s config.json: {error}") from None


# The cache ------------------------------------------------------------------


def cache_root():
    """Keras' cache folder, as `keras.utils.get_file` picks it: $KERAS_HOME (read
    now, so setting it after Keras loaded counts too), else ~/.keras, and a
    temporary folder where that isn't writable."""
    home = os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras"))
    try:
        os.makedirs(home, exist_ok=True)
    except OSError:
        pass
    if not os.access(home, os.W_OK):
        home = os.path.join(tempfile.gettempdir(), ".keras")
    return home


def cache_path(url):
    """Where the download of `url` is kept: its host and path under the cache,
    so files of the same name from two places (two hf:// repos) never meet."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2].replace(":", "_")
    segments = [segment for segment in urllib.parse.unquote(parts.path).split("/")
                if segment not in ("", ".", "..")]
    if not host or not segments:
        raise ValueError(f"weights={url!r}: the URL names no file.")
    return os.path.join(cache_root(), CACHE_SUBDIR, host, *segments)


def download(url, target):
    """Download `url` to `target` through `keras.utils.get_file`, or raise one
    line: `WeightsUnavailable` naming the URL and `target`, or a ValueError
    (`HashMismatch`, or contents that aren't what `target` is named: an error
    page served as a file), the download then deleted."""
    root = cache_root()
    directory, file_name = os.path.split(target)
    # A private name until it is checked: a crashed download, or another
    # process downloading the same file, never leaves a partial file at `target`.
    partial_name = f".{file_name}.{uuid.uuid4().hex[:12]}.part"
    try:
        partial = keras.utils.get_file(
            fname=partial_name, origin=url, cache_dir=root,
            cache_subdir=os.path.relpath(directory, root), force_download=True,
        )
    except Exception as error:  # get_file raises a bare Exception for HTTP and URL errors
        raise WeightsUnavailable(
            f"Could not download {url} ({_reason(error, url)}); to use it offline, "
            f"place the file at {target}"
        ) from None
    try:
        check_hash_prefix(partial, file_name, url)
        _check_contents(partial, target, url)
    except ValueError:
        os.remove(partial)
        raise
    os.replace(partial, target)


def _check_contents(path, target, url):
    """Raise unless the download at `path` reads as what `target` is named:
    JSON for a .json file, else a weights file."""
    try:
        if target.endswith(".json"):
            try:
                _read_json(path)
            except ValueError as error:
                raise ValueError(f"{path} is not a JSON object ({error})") from None
        else:
            readers.detect_format(path)
    except (ValueError, zipfile.BadZipFile) as error:
        problem = " ".join(str(error).replace(path, target).split()) or type(error).__name__
        raise ValueError(
            f"{problem.rstrip('.')}. Downloaded from {url} and deleted; nothing was loaded."
        ) from None


def check_hash_prefix(path, file_name, url):
    """Raise `HashMismatch` unless `path`'s sha256 starts with the prefix in
    `file_name` (a file name without one passes)."""
    mismatch = _hash_prefix_mismatch(path, file_name)
    if mismatch is not None:
        raise HashMismatch(
            f"Refused {file_name} from {url}: its sha256 is {mismatch[1]}, but its name says "
            f"it starts with {mismatch[0]}; the download was deleted and nothing was loaded."
        )


def check_cached_hash_prefix(path, url):
    """Raise `HashMismatch` unless the cached (or hand-placed) file at `path`
    has the sha256 prefix its name carries; the file is left where it is."""
    mismatch = _hash_prefix_mismatch(path, os.path.basename(path))
    if mismatch is not None:
        raise HashMismatch(
            f"Refused {path}: its sha256 is {mismatch[1]}, but its name says it starts with "
            f"{mismatch[0]}; replace it with the file from {url}, or delete it to download it "
            "again. Nothing was loaded."
        )


def _hash_prefix_mismatch(path, file_name):
    """`(prefix, sha256)` where `file_name` carries a hash prefix that `path`'s
    sha256 doesn't start with; None otherwise (no prefix, or a match)."""
    match = _HASH_PREFIX.search(file_name)
    if match is None:
        return None
    digest = sha256_of(path)
    return None if digest.startswith(match[1]) else (match[1], digest)


def sha256_of(path):
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _reason(error, url):
    """Why a download failed, from get_file's 'URL fetch failure on URL: CODE -- REASON'."""
    text = " ".join(str(error).split()) or type(error).__name__
    prefix = f"URL fetch failure on {url}: "
    if not text.startswith(prefix):
        return text
    code, _, reason = text[len(prefix):].partition(" -- ")
    return reason if code == "None" else f"HTTP {code} {reason}"
