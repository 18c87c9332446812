"""The streamlit page, run headless with streamlit's AppTest on the tiny config."""

import numpy as np
import pytest

streamlit_testing = pytest.importorskip("streamlit.testing.v1", reason="pip install streamlit")


def _page(tiny_weights):
    at = streamlit_testing.AppTest.from_file(str(tiny_weights.config.parents[2] / "demo" / "sampling.py"),
                                             default_timeout=600)
    at.run()
    at.text_input(key="config").set_value(str(tiny_weights.config))
    at.text_input(key="weight").set_value(str(tiny_weights.single_file))
    for key, value in (("steps", 3), ("width", 64), ("height", 64), ("num_images", 2)):
        at.number_input(key=key).set_value(value)
    at.text_area(key="prompt").set_value("a photo of sks dog")
    return at


def test_page_samples_shows_and_offers_download(tiny_weights):
    at = _page(tiny_weights)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error
    images = at.session_state["images"]
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    kinds = [type(element).__name__ for element in at.main.children.values()]
    assert kinds.count("Image") == 2
    downloads = [e for e in at.main.children.values() if type(e).__name__ == "DownloadButton"]
    assert [d.label for d in downloads] == ["Download image 0", "Download image 1"]

    # a second click with another seed reuses the cached model and gives other images
    engine_id = at.session_state["engine_id"]
    at.number_input(key="seed").set_value(7)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error
    assert at.session_state["engine_id"] == engine_id
    assert not np.array_equal(at.session_state["images"], images)


def test_bad_value_shows_an_error_not_a_traceback(tiny_weights):
    at = _page(tiny_weights)
    at.text_input(key="weight").set_value(str(tiny_weights.root / "missing.safetensors"))
    at.button(key="generate").click().run()
    assert not at.exception
    assert "missing.safetensors" in at.error[0].value


def test_lora_list_with_scales_reaches_the_loader(tiny_weights):
    at = _page(tiny_weights)
    at.text_area(key="lora").set_value(f"{tiny_weights.root / 'missing_lora.safetensors'}:0.7")
    at.button(key="generate").click().run()
    assert not at.exception
    assert "missing_lora.safetensors" in at.error[0].value
