"""tasks/evaluate/predict.py: images in every accepted format, and inputs refused."""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.base.config import PipelineConfig
from tasks.dataset import CLASS_NAMES, FashionMNIST
from tasks.evaluate.predict import TOP_K, InputError, format_predictions, predict, read_input_images
from tests.support.evaluate import TrainedRun, _one_line


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max())
    return exp / exp.sum()


# --- predict --------------------------------------------------------------------------------


def test_predict_png_as_is_and_warns_on_light_background(
    trained_run: TrainedRun, data: FashionMNIST, image_png: Path, config: PipelineConfig
) -> None:
    inverted = image_png.with_name("inverted.png")
    Image.fromarray(255 - data.test_images[0], mode="L").save(inverted)

    plain, light = predict(trained_run.run_dir.as_uri(), [image_png, inverted], config)

    expected = _softmax(trained_run.test_logits[0])
    ranked = np.argsort(-expected)[:TOP_K]
    assert plain.source == "test-0.png"
    assert [name for name, _ in plain.top] == [CLASS_NAMES[i] for i in ranked]
    assert [p for _, p in plain.top] == pytest.approx(expected[ranked].tolist(), rel=1e-4)
    assert plain.label == CLASS_NAMES[ranked[0]]
    assert plain.notes == ()
    # Not inverted, but the user is told why the prediction may be poor.
    assert len(light.notes) == 1
    assert "light background" in light.notes[0] and "not inverted" in light.notes[0]

    printed = format_predictions([plain, light])
    assert f"{plain.label} {plain.top[0][1]:.1%}" in printed
    assert "light background" in printed


def test_predict_bigger_rgb_jpeg_states_the_conversion(
    trained_run: TrainedRun, data: FashionMNIST, tmp_path: Path, config: PipelineConfig
) -> None:
    original = data.test_images[1]
    jpeg = tmp_path / "big.jpg"
    Image.fromarray(original, mode="L").resize((112, 112), Image.Resampling.NEAREST).convert(
        "RGB"
    ).save(jpeg, quality=95)

    [prediction] = predict(str(trained_run.run_dir), [jpeg], config)

    assert prediction.notes == ("converted RGB to grayscale", "resized 112x112 to 28x28")
    probabilities = [p for _, p in prediction.top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
    # The converted pixels are the original image, up to JPEG and resampling error.
    [(_, pixels, _)] = read_input_images(jpeg)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - original.astype(int)).mean() < 8
    assert "converted RGB to grayscale" in format_predictions([prediction])


def test_predict_idx_raw_and_gzipped(
    trained_run: TrainedRun, data: FashionMNIST, tmp_path: Path, config: PipelineConfig
) -> None:
    count = 7
    idx = struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28) + data.test_images[:count].tobytes()
    raw_path, gz_path = tmp_path / "few-images-idx3-ubyte", tmp_path / "few-images-idx3-ubyte.gz"
    raw_path.write_bytes(idx)
    gz_path.write_bytes(gzip.compress(idx))

    predictions = predict(str(trained_run.run_dir), [raw_path, gz_path], config)

    expected = [CLASS_NAMES[i] for i in trained_run.test_logits[:count].argmax(axis=1)]
    assert [p.label for p in predictions] == expected * 2
    assert [p.source for p in predictions[:2]] == [
        "few-images-idx3-ubyte[0]",
        "few-images-idx3-ubyte[1]",
    ]
    assert predictions[count].source == "few-images-idx3-ubyte.gz[0]"
    assert all(p.notes == () and len(p.top) == TOP_K for p in predictions)


def test_inputs_that_are_not_images(
    trained_run: TrainedRun, data: FashionMNIST, tmp_path: Path, config: PipelineConfig
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("these are my notes, not a picture\n")
    buffer = io.BytesIO()
    Image.fromarray(data.test_images[0], mode="L").save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([1, 2, 3]))
    bad_gzip = tmp_path / "broken.gz"
    bad_gzip.write_bytes(gzip.compress(b"x" * 100)[:20])

    cases = {
        text: "not a PNG/JPEG image nor an IDX file",
        truncated: "cannot decode the image",
        labels: "is it a labels file?",
        bad_gzip: "corrupt gzip data",
        tmp_path / "absent.png": "cannot read: No such file or directory",
    }
    for path, expected in cases.items():
        with pytest.raises(InputError) as info:
            predict(str(trained_run.run_dir), [path], config)
        message = _one_line(info)
        assert str(path) in message and expected in message


# --- untrusted inputs and unverified runs (issue 15, items 7 and 9) ---------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_predict_refuses_decompression_bombs(
    trained_run: TrainedRun, tmp_path: Path, config: PipelineConfig
) -> None:
    huge = tmp_path / "huge.png"  # 400 M pixels: PIL raises DecompressionBombError
    huge.write_bytes(_png_header_only(20_000, 20_000))
    large = tmp_path / "large.png"  # 144 M pixels: PIL only warns, then decodes
    large.write_bytes(_png_header_only(12_000, 12_000))
    idx_bomb = tmp_path / "bomb-idx3-ubyte.gz"  # 80 KB that inflate to 80 MB
    side = 28 * 28
    count = 80 * 2**20 // side
    idx_bomb.write_bytes(
        gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28) + bytes(count * side))
    )
    assert idx_bomb.stat().st_size < 1 << 20
    cases = {huge: "pixels", large: "pixels", idx_bomb: "inflates to more than"}
    for path, expected in cases.items():
        with pytest.raises(InputError) as info:
            predict(str(trained_run.run_dir), [path], config)
        message = _one_line(info)
        assert str(path) in message and expected in message
