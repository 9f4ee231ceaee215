"""A source path of the wrong kind is one line from both command lines, never a traceback."""

import numpy as np
import pytest

from pyfast.cli import doctor, train

from .builders import write_npz


@pytest.fixture
def wrong_paths(tmp_path):
    npz_file = write_npz(tmp_path / "data" / "one.npz", image=np.zeros((8, 8, 3), np.uint8), boxes=np.zeros((0, 4)),
                         masks=np.zeros((0, 8, 8), bool))
    folder = tmp_path / "data"
    return {
        f"npz:{npz_file}": f"npz source path '{npz_file}' is not a folder; npz:PATH takes a folder of .npz files",
        f"coco:{folder},images={folder}": f"COCO annotation path '{folder}' is a folder; coco:PATH takes the instances JSON file",
        f"coco:{npz_file},images={npz_file}": f"COCO images= path '{npz_file}' is not a folder",
    }


@pytest.mark.parametrize("program", ["pyfast-doctor", "pyfast-train"])
def test_wrong_kind_of_path_is_one_line_with_exit_2(program, wrong_paths, tmp_path, capsys):
    for number, (spec, message) in enumerate(wrong_paths.items()):
        if program == "pyfast-doctor":
            code = doctor.main(["data", "--data", spec])
        else:
            code = train.main(["--data", spec, "--epochs", "1", "--image-size", "64", "--no-progress",
                               "--out", str(tmp_path / f"run{number}")])
        err = capsys.readouterr().err
        assert code == 2, spec
        assert err.startswith(f"{program}: error: ") and message in err and err.count("\n") == 1, err
