"""The synthetic brain MRI volumes (``advseg data synth --kind mri``): Decathlon layout, three
labels of different kinds, a bias field and Rician noise, read by the volume loader as MRI."""

import nibabel as nib
import numpy as np
import pytest

from advseg.cli import main
from advseg.data import DataConfig, dataset_json_labels, load_volumes
from advseg.data.synth_mri import MRI_LABELS, bias_field, write_synthetic_mri
from advseg.errors import UserError


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri") / "brain"
    write_synthetic_mri(root, cases=3, slices=24, size=(48, 48), seed=1)
    return root


def _arrays(root, case=1):
    name = f"mrbrain_{case:03d}.nii.gz"
    image = nib.load(root / "imagesTr" / name)
    label = np.asanyarray(nib.load(root / "labelsTr" / name).dataobj)
    return image, np.asanyarray(image.dataobj), label


def test_volumes_are_t1_like_with_three_kinds_of_label(mri):
    image, voxels, label = _arrays(mri)
    assert voxels.dtype == np.int16 and voxels.shape == (48, 48, 24) == label.shape
    assert image.header.get_zooms() == pytest.approx((1.0, 1.0, 1.2))
    assert {0, 1, 2} <= set(np.unique(label)) <= {0, 1, 2, 3}
    assert any(3 in np.unique(_arrays(mri, c)[2]) for c in (1, 2, 3))  # a lesion somewhere
    ventricles, thalamus = voxels[label == 1].mean(), voxels[label == 2].mean()
    assert ventricles < 0.6 * thalamus  # dark CSF; the deep grey matter is mid-grey
    # Rician noise: the background outside the head is noise (>= 0, not a constant 0).
    corner = voxels[:4, :4, :].astype(float)
    assert corner.min() >= 0 and corner.mean() > 5 and corner.std() > 3


def test_the_bias_field_is_smooth_bounded_and_not_flat():
    x = np.linspace(-1, 1, 20)[:, None, None]
    y = np.linspace(-1, 1, 20)[None, :, None]
    z = np.linspace(-1, 1, 10)[None, None, :]
    field = bias_field(x, y, z, np.random.default_rng(0))
    assert field.shape == (20, 20, 10)
    assert field.min() >= 1 / 1.35 - 1e-9 and field.max() <= 1.35 + 1e-9
    assert field.max() / field.min() > 1.2  # a real gain across the volume
    assert np.abs(np.diff(field, axis=0)).max() < 0.1  # smooth: small steps between voxels


def test_labels_come_from_dataset_json_and_the_loader_reads_it_as_mri(mri, tmp_path):
    assert dataset_json_labels(mri) == MRI_LABELS
    data = load_volumes(DataConfig(path=mri, cache_dir=tmp_path / "cache"))
    assert len(data) == 3 and data.classes == list(MRI_LABELS.values())
    assert data.normalisation["kind"] == "mri"
    low, high = data.valid_range  # finite: the z-scored volumes' extremes (VAFA needs one)
    assert low == min(float(i.min()) for i in data.images) and high > 2
    image, masks = data.volume(0)
    assert image.shape[0] == 1 and masks.shape[0] == 3
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-2  # z-scored


def test_same_seed_same_voxels_and_bad_sizes_are_refused(tmp_path):
    a = write_synthetic_mri(tmp_path / "a", cases=1, slices=8, size=(16, 16), seed=3).path
    b = write_synthetic_mri(tmp_path / "b", cases=1, slices=8, size=(16, 16), seed=3).path
    c = write_synthetic_mri(tmp_path / "c", cases=1, slices=8, size=(16, 16), seed=4).path
    assert np.array_equal(_arrays(a)[1], _arrays(b)[1])
    assert not np.array_equal(_arrays(a)[1], _arrays(c)[1])
    with pytest.raises(UserError, match="--slices"):
        write_synthetic_mri(tmp_path / "d", slices=4)


def test_data_synth_kind_mri(tmp_path, capsys):
    out = tmp_path / "brain"
    with pytest.raises(SystemExit) as code:
        main(["data", "synth", "--kind", "mri", "--out", str(out), "--cases", "2",
              "--slices", "8"])  # fmt: skip
    assert code.value.code == 0 and "wrote 2 brain MRI volumes" in capsys.readouterr().out
    assert (out / "dataset.json").is_file() and len(list((out / "imagesTr").iterdir())) == 2
    with pytest.raises(SystemExit) as code:
        main(["data", "synth", "--kind", "pet", "--out", str(tmp_path / "x")])
    assert code.value.code == 2 and "phantom, nifti, mri" in capsys.readouterr().err
