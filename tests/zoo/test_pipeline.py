import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditq_compiler import zoo

EXAMPLE = Path(__file__).parents[2] / "examples" / "quantize_dit_pipeline.py"


def test_digits_pipeline_samples_in_every_output_type():
    pipe = zoo.pipeline("dit-digits")
    pipe.set_progress_bar_config(disable=True)
    call = dict(class_labels=[3, 8], num_inference_steps=4)
    pt = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    assert pt.shape == (2, 1, 8, 8) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    np_images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    torch.testing.assert_close(torch.from_numpy(np_images).permute(0, 3, 1, 2), pt)
    (pil,) = pipe(generator=torch.Generator().manual_seed(0), return_dict=False, **call)
    assert len(pil) == 2 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 10\)"):
        pipe(class_labels=[10])
    with pytest.raises(KeyError, match="not a DiT"):
        zoo.pipeline("unet-digits")


def test_the_pipeline_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "10", "--quiet", "--recipe", "w8a8-minmax",
                             "--grid", str(tmp_path / "grid.png"), "--save", str(tmp_path / "artifact")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max |quantized - FP|" in result.stdout and "class accuracy (digit classifier): FP" in result.stdout
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "artifact" / "manifest.json").is_file()
