"""Weights by name, URL and hf:// handle (issue 11): downloaded once into
Keras' cache from a loopback server, checked against the hash in their name,
and one line naming the URL and the cache path when neither works."""

import functools
import hashlib
import http.server
import json
import os
import pathlib
import threading

import keras
import pytest
from safetensors.numpy import save_file

import keras_resnext as kr
from keras_resnext.transforms import EvalTransform
from keras_resnext.weights import HashMismatch, WeightsUnavailable, catalog, fetch
from test_torch_zip import TINY, torchvision_pth
from test_weights import assert_same_weights, randomise_batch_norms, torchvision_state_dict


class LoopbackServer:
    """Serves a folder on 127.0.0.1 and counts the files it sent."""

    def __init__(self, folder):
        self.folder = folder
        self.sent = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.sent.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    loopback = LoopbackServer(served)
    yield loopback
    loopback.stop()


@pytest.fixture(autouse=True)
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tiny():
    return randomise_batch_norms(kr.ResNeXt29(**TINY, classifier_activation=None), seed=11)


@pytest.fixture(scope="module")
def tiny_pth(tiny, tmp_path_factory):
    """The tiny model as a torchvision .pth named as torchvision names its files."""
    path = torchvision_pth(tiny, tmp_path_factory.mktemp("pth") / "tiny.pth")
    digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    return pathlib.Path(path), f"resnext11_4x4d-{digest[:8]}.pth"


@pytest.fixture
def named(tiny_pth, server, monkeypatch):
    """A catalog whose one entry is the tiny model's file on the loopback server."""
    path, file_name = tiny_pth
    (server.folder / file_name).write_bytes(path.read_bytes())
    entry = catalog.NamedWeights("resnext11_4x4d", catalog.V1, file_name, top1=1.0, top5=2.0,
                                 resize_size=18, image_size=16)
    monkeypatch.setattr(catalog, "TORCHVISION_WEIGHTS", (entry,))
    monkeypatch.setenv(catalog.TORCHVISION_URL_VARIABLE, server.url)
    return entry


def build_tiny(weights):
    return kr.ResNeXt29(**TINY, classifier_activation=None, weights=weights)


def one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


# Named weights ----------------------------------------------------------------


def test_named_weights_download_once_and_then_load_offline(
        tiny, named, server, keras_home, tmp_path):
    model = build_tiny("imagenet")
    assert_same_weights(model, tiny)
    assert model.eval_transform == EvalTransform(16, 18, "bilinear")
    model.save(tmp_path / "tiny.keras")
    assert keras.saving.load_model(tmp_path / "tiny.keras").eval_transform == model.eval_transform
    cached = keras_home / "keras_resnext" / f"127.0.0.1_{server.httpd.server_port}" / named.file
    assert cached.is_file()
    assert os.listdir(cached.parent) == [named.file]  # no partial download left beside it
    server.stop()
    assert_same_weights(build_tiny("ImageNet1K_v1"), tiny)
    assert server.sent == [f"/{named.file}"]


def test_a_download_whose_hash_differs_from_its_name_is_refused_and_deleted(
        tiny_pth, named, server, keras_home):
    tampered = bytearray(tiny_pth[0].read_bytes())
    tampered[-100] ^= 1
    (server.folder / named.file).write_bytes(bytes(tampered))
    with pytest.raises(HashMismatch) as error:
        build_tiny("imagenet")
    message = one_line(error)
    assert named.file in message and hashlib.sha256(tampered).hexdigest() in message
    assert f"starts with {named.file.split('-')[1][:8]}" in message
    assert not [files for _, _, files in os.walk(keras_home / "keras_resnext") if files]


@pytest.mark.parametrize("file_name", ["tiny.pth", "config.json"])
def test_an_error_page_served_as_a_file_is_refused_and_not_kept(server, keras_home, file_name):
    (server.folder / file_name).write_text("<html>Please sign in to the hotel wifi</html>")
    url = server.url + file_name
    with pytest.raises(ValueError) as error:
        fetch.WeightsSource(url, fetch.cache_path(url), url).local_path()
    message = one_line(error)
    assert fetch.cache_path(url) in message
    assert message.endswith(f"Downloaded from {url} and deleted; nothing was loaded.")
    assert not [files for _, _, files in os.walk(keras_home / "keras_resnext") if files]


def test_names_are_case_insensitive_and_unknown_ones_list_the_valid_ones():
    for name in ("imagenet", "IMAGENET", "imagenet1k_v2", "ImageNet1K_V1"):
        assert catalog.is_weights_name(name)
    with pytest.raises(ValueError) as error:
        build_tiny("imagenet21k")
    message = one_line(error)
    assert "Unknown weights 'imagenet21k'" in message
    assert "imagenet, IMAGENET1K_V1, IMAGENET1K_V2" in message


def test_an_architecture_without_named_weights_lists_those_that_have_them():
    with pytest.raises(ValueError) as error:
        build_tiny("imagenet")
    message = one_line(error)
    assert message.startswith("weights='imagenet': resnext11_4x4d has no weights of that name.")
    assert "resnext50_32x4d (IMAGENET1K_V1, IMAGENET1K_V2)" in message
    assert "resnext101_64x4d (IMAGENET1K_V1)" in message
    with pytest.raises(ValueError, match="resnext101_64x4d has no weights of that name"):
        fetch.resolve("IMAGENET1K_V2", "resnext101_64x4d")


@pytest.mark.parametrize("architecture, name, file", [
    ("resnext50_32x4d", "imagenet", "resnext50_32x4d-1a0047aa.pth"),
    ("resnext50_32x4d", "IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth"),
    ("resnext101_32x8d", "imagenet", "resnext101_32x8d-110c445d.pth"),
    ("resnext101_64x4d", "imagenet", "resnext101_64x4d-173b62eb.pth"),
    ("resnet152", "imagenet1k_v2", "resnet152-f82ba261.pth"),
])
def test_names_resolve_to_torchvisions_files_and_eval_transforms(architecture, name, file,
                                                                 monkeypatch):
    monkeypatch.delenv(catalog.TORCHVISION_URL_VARIABLE, raising=False)
    source = fetch.resolve(name, architecture)
    assert source.url == "https://download.pytorch.org/models/" + file
    resize_size = 256 if name.upper() == "IMAGENET1K_V1" and "64x4d" not in architecture else 232
    assert source.eval_transform == EvalTransform(224, resize_size, "bilinear")


def test_the_readme_table_is_the_catalog():
    from conftest import REPO_ROOT

    readme = pathlib.Path(REPO_ROOT, "README.md").read_text()
    for entry in catalog.TORCHVISION_WEIGHTS:
        best = catalog.named_weights("imagenet", entry.architecture) == entry
        row = (f"| `{entry.architecture}` | {entry.name} | {'✓ ' if best else ''}| "
               f"`{entry.file}` | {entry.top1:.3f} | {entry.top5:.3f} | "
               f"{entry.resize_size} → {entry.image_size}, {entry.interpolation} |")
        assert row in readme


@pytest.mark.parametrize("stem, stage_depths, cardinality, width, name", [
    ("imagenet", (3, 4, 6, 3), 32, 4, "resnext50_32x4d"),
    ("imagenet", (3, 4, 23, 3), 32, 8, "resnext101_32x8d"),
    ("imagenet", (3, 8, 36, 3), 1, 64, "resnet152"),
    ("cifar", (3, 3, 3), 8, 64, "resnext29_8x64d"),
    ("cifar", (11, 11, 11), 32, 8, None),  # a CIFAR ResNeXt-101 isn't the ImageNet one
    ("imagenet", (1, 1, 1, 1), 32, 4, None),
])
def test_the_architecture_names_its_weights(stem, stage_depths, cardinality, width, name):
    assert catalog.architecture_name(stem, stage_depths, cardinality, width) == name


def test_a_given_eval_transform_is_kept_and_load_weights_records_the_weights_one(
        tiny, named):
    given = EvalTransform(16, 20, "bicubic")
    model = kr.ResNeXt29(**TINY, classifier_activation=None, weights="imagenet",
                         eval_transform=given)
    assert model.eval_transform == given
    built = kr.ResNeXt29(**TINY, classifier_activation=None)
    kr.load_weights(built, "IMAGENET1K_V1")
    assert_same_weights(built, tiny)
    assert built.eval_transform == EvalTransform(16, 18)


# Offline ---------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["server stopped", "404"])
def test_offline_with_nothing_cached_is_one_line_naming_url_and_path(named, server, failure):
    if failure == "404":
        (server.folder / named.file).unlink()
    else:
        server.stop()
    url = server.url + named.file
    with pytest.raises(WeightsUnavailable) as error:
        build_tiny(catalog.V1)
    message = one_line(error)
    assert isinstance(error.value, OSError)
    assert url in message
    assert message.endswith(f"place the file at {fetch.cache_path(url)}")
    assert ("HTTP 404" in message) == (failure == "404")


def test_the_builders_resolve_their_preset_and_say_where_to_place_its_file(
        monkeypatch, keras_home):
    stopped = LoopbackServer(keras_home.parent)
    stopped.stop()
    monkeypatch.setenv(catalog.TORCHVISION_URL_VARIABLE, stopped.url)
    with pytest.raises(WeightsUnavailable) as error:
        kr.build("resnext50_32x4d", weights="IMAGENET1K_V1", input_shape=(64, 64, 3))
    path = keras_home / "keras_resnext" / f"127.0.0.1_{stopped.httpd.server_port}"
    assert one_line(error).endswith(f"place the file at {path / 'resnext50_32x4d-7cdf4587.pth'}")


def test_convert_cli_exits_with_the_one_line(named, server, tmp_path):
    from keras_resnext import convert

    server.stop()
    url = server.url + named.file
    with pytest.raises(SystemExit) as exit_:
        convert.main([url, str(tmp_path / "out.weights.h5"), "--model", "resnext29_8x64d"])
    message = exit_.value.code
    assert message.startswith(f"convert: Could not download {url} ("), message
    assert "Connection refused" in message and "\n" not in message, message
    assert message.endswith(f"); to use it offline, place the file at {fetch.cache_path(url)}")


def test_training_cli_exits_1_with_the_one_line(named, server, tmp_path):
    from image_folder import write_image_folder
    from test_cli_outcomes import TINY_MODEL, error_line
    from test_train_cli import run_cli

    data = write_image_folder(str(tmp_path / "images"), classes=3, train_per_class=1)
    server.stop()
    url = server.url + named.file
    completed = run_cli("cifar.py", "--eval_only", f"--weights={url}", f"--dataset=folder:{data}",
                        "--batch_size=2", *TINY_MODEL)[0]
    assert completed.returncode == 1, completed.stderr[-3000:]
    line = error_line(completed)
    assert line.startswith(f"Error: Could not download {url} "), line
    assert line.endswith(f"place the file at {fetch.cache_path(url)}"), line


# URLs and hf:// ------------------------------------------------------------------


def test_file_urls_load_the_file_they_name(tiny, tiny_pth):
    assert_same_weights(build_tiny(tiny_pth[0].as_uri()), tiny)


def test_http_urls_of_any_format_are_cached_under_their_host_and_path(tiny, server, tmp_path):
    folder = server.folder / "a" / "b"
    folder.mkdir(parents=True)
    tiny.save_weights(str(folder / "tiny.weights.h5"))
    url = server.url + "a/b/tiny.weights.h5"
    assert_same_weights(build_tiny(url), tiny)
    assert fetch.cache_path(url).endswith(os.path.join("a", "b", "tiny.weights.h5"))
    assert os.path.isfile(fetch.cache_path(url))


PRETRAINED_CFG = {
    "input_size": [3, 16, 16], "test_input_size": [3, 24, 24], "interpolation": "bicubic",
    "crop_pct": 0.8, "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    "num_classes": 3,
}


def serve_hf_repo(server, repo, model, config):
    folder = server.folder / repo / "resolve" / "main"
    folder.mkdir(parents=True)
    save_file(torchvision_state_dict(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def test_hf_repos_load_their_safetensors_with_their_eval_transform(tiny, server, monkeypatch):
    other = randomise_batch_norms(kr.ResNeXt29(**TINY, classifier_activation=None), seed=12)
    serve_hf_repo(server, "timm/tiny.a1_in1k", tiny,
                  {"architecture": "resnext11_4x4d", "pretrained_cfg": PRETRAINED_CFG})
    serve_hf_repo(server, "someone/tiny.a1_in1k", other, PRETRAINED_CFG)  # not nested
    monkeypatch.setenv(catalog.HF_URL_VARIABLE, server.url.rstrip("/"))

    # timm's resize: floor(16 / 0.8)
    timm_transform = EvalTransform(16, 20, "bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    source = fetch.resolve("hf://timm/tiny.a1_in1k", "resnext11_4x4d")
    assert source.eval_transform == timm_transform
    assert os.path.join("timm", "tiny.a1_in1k") in source.path
    model = build_tiny("hf://timm/tiny.a1_in1k")
    assert_same_weights(model, tiny)
    assert model.eval_transform == timm_transform
    assert_same_weights(build_tiny("hf://someone/tiny.a1_in1k"), other)
    server.stop()
    assert_same_weights(build_tiny("hf://timm/tiny.a1_in1k"), tiny)


def test_an_hf_repo_of_another_architecture_is_refused_before_its_weights_download(
        tiny, server, monkeypatch):
    serve_hf_repo(server, "timm/resnext50_32x4d.a1h_in1k", tiny,
                  {"architecture": "resnext50_32x4d", "pretrained_cfg": PRETRAINED_CFG})
    monkeypatch.delenv(catalog.HF_URL_VARIABLE, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # huggingface_hub's mirror variable
    with pytest.raises(ValueError) as error:
        build_tiny("hf://timm/resnext50_32x4d.a1h_in1k")
    assert one_line(error) == ("hf://timm/resnext50_32x4d.a1h_in1k holds timm's resnext50_32x4d, "
                               "which doesn't fit a resnext11_4x4d; build a resnext50_32x4d to "
                               "load it.")
    assert not any(path.endswith("model.safetensors") for path in server.sent)


@pytest.mark.parametrize("weights, message", [
    ("hf://timm", "expected hf://OWNER/REPO"),
    ("ftp://example.com/w.pth", "unsupported URL scheme 'ftp'"),
])
def test_malformed_handles_and_schemes_are_one_line(weights, message):
    with pytest.raises(ValueError, match=message) as error:
        fetch.resolve(weights, None)
    one_line(error)


def test_a_file_placed_in_the_cache_by_hand_must_match_its_hash_prefix(
        tiny, named, server, keras_home):
    # The offline message says where to place the file; what is placed there
    # is checked as a download is, and left alone when it doesn't match.
    server.stop()
    with pytest.raises(WeightsUnavailable) as raised:
        build_tiny("imagenet")
    placed = pathlib.Path(one_line(raised).rpartition("place the file at ")[2])
    placed.parent.mkdir(parents=True, exist_ok=True)
    other = torchvision_pth(kr.ResNeXt29(**TINY, classifier_activation=None),
                            placed.parent / "other.pth")
    os.replace(other, placed)
    with pytest.raises(HashMismatch) as raised:
        build_tiny("imagenet")
    message = one_line(raised)
    assert message.startswith(f"Refused {placed}: its sha256 is ")
    assert f"replace it with the file from {server.url}{named.file}" in message
    assert placed.is_file()
    placed.write_bytes(server.folder.joinpath(named.file).read_bytes())
    assert_same_weights(build_tiny("imagenet"), tiny)
