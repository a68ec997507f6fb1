from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ML1M
from training.data import Dataset, DatasetError, download_ml1m, load_ml1m, make_synthetic

MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action|Crime|Thriller\n3::Up (2009)::Animation\n"
)
RATINGS = "1::2::5::300\n1::1::4::100\n1::3::3::200\n2::1::5::50\n2::3::4::60\n2::2::1::70\n"


def _write_ml1m(d: Path, movies: str = MOVIES, ratings: str = RATINGS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.dat").write_text(movies, encoding="latin-1")
    (d / "ratings.dat").write_text(ratings)
    return d


def test_ml1m_format_sorted_by_time_and_texts(tmp_path):
    ds = load_ml1m(_write_ml1m(tmp_path / "ml-1m"))
    assert ds.num_users == 2 and ds.num_items == 3
    # user 1 rated movie 1 at t=100, 3 at 200, 2 at 300 -> indices 1, 3, 2 in time order
    assert ds.seqs[0].tolist() == [1, 3, 2]
    assert ds.times[0].tolist() == [100, 200, 300]
    assert ds.item_texts[0] == "Toy Story (1995) | Animation, Children's, Comedy"


def test_leave_one_out_split_last_item_is_test():
    ds = make_synthetic(num_users=50, num_items=60, seed=3)
    for u in range(ds.num_users):
        hist, _, target, _ = ds.test_example(u)
        assert target == ds.seqs[u][-1]
        assert hist.tolist() == ds.seqs[u][:-1].tolist()
        vhist, _, vtarget, _ = ds.valid_example(u)
        assert vtarget == ds.seqs[u][-2]
        assert ds.train_seq(u)[0].tolist() == ds.seqs[u][:-2].tolist() == vhist.tolist()


def test_dataset_roundtrip(tmp_path):
    ds = make_synthetic(num_users=20, num_items=30)
    ds.save(tmp_path / "d.npz")
    back = Dataset.load(tmp_path / "d.npz")
    assert back.fingerprint() == ds.fingerprint()
    assert back.item_texts == ds.item_texts


def test_synthetic_scales_to_large_catalogs():
    ds = make_synthetic(num_users=100, num_items=1_000_000, num_clusters=1000, seed=1)
    assert ds.num_items == 1_000_000
    assert max(int(s.max()) for s in ds.seqs) <= 1_000_000


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d.mkdir(), (d / "movies.dat").write_text(MOVIES)), "lacks ratings.dat"),
        (lambda d: _write_ml1m(d, ratings="1::2::five::300\n"), "UserID::MovieID::Rating::Timestamp"),
        (lambda d: _write_ml1m(d, ratings="1::2::5\n"), "4 '::'-separated"),
        (lambda d: _write_ml1m(d, movies="garbage line\n"), "expected 'MovieID::Title"),
        (lambda d: _write_ml1m(d, ratings="1::99::5::3\n"), "not in the items table"),
    ],
)
def test_bad_data_dirs_give_clear_errors(tmp_path, setup, needle):
    d = tmp_path / "ml-1m"
    setup(d)
    with pytest.raises(DatasetError) as e:
        load_ml1m(d)
    assert needle in str(e.value)
    assert str(d) in str(e.value)


def _zip(tmp_path: Path) -> tuple[Path, str]:
    src = _write_ml1m(tmp_path / "src" / "ml-1m")
    z = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in ("movies.dat", "ratings.dat"):
            zf.write(src / f, f"ml-1m/{f}")
    return z, hashlib.sha256(z.read_bytes()).hexdigest()


def test_download_verifies_sha256_and_extracts(tmp_path):
    z, sha = _zip(tmp_path)
    dest = download_ml1m(tmp_path / "dl" / "ml-1m", url=z.as_uri(), sha256=sha)
    assert load_ml1m(dest).num_users == 2


def test_download_rejects_wrong_checksum(tmp_path):
    z, _ = _zip(tmp_path)
    with pytest.raises(DatasetError, match="SHA-256"):
        download_ml1m(tmp_path / "dl" / "ml-1m", url=z.as_uri(), sha256="0" * 64)
    assert not (tmp_path / "dl" / "ml-1m").exists()


def test_download_unreachable_url_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="could not download"):
        download_ml1m(tmp_path / "x", url=(tmp_path / "nope.zip").as_uri(), sha256="0" * 64)


@pytest.mark.skipif(not ML1M.is_dir(), reason="MovieLens-1M not present beside the checkout")
def test_real_ml1m_counts():
    ds = load_ml1m(ML1M)
    assert ds.num_users == 6040
    assert sum(len(s) for s in ds.seqs) == 1_000_209
    assert len(np.unique(np.concatenate(ds.seqs))) == 3706
    assert all((np.diff(t) >= 0).all() for t in ds.times[:500])
