"""trainer.data: finding a Stanford-layout dataset (local and s3://), splits, analysis."""

from __future__ import annotations

import shutil
from collections import Counter

import boto3
import pytest
from moto import mock_aws

from tests.conftest import SAMPLES, colour_photo
from trainer import data

MANIFEST = SAMPLES.parent / "MANIFEST.tsv"


def test_find_dataset_indexes_breed_folders_and_ignores_other_files(tmp_path):
    (tmp_path / "n02085620-Chihuahua").mkdir()
    (tmp_path / "n02085620-Chihuahua" / "a.jpg").write_bytes(colour_photo((200, 0, 0)))
    (tmp_path / "n02085620-Chihuahua" / "notes.txt").write_text("not a photo")
    (tmp_path / "not-a-breed").mkdir()
    (tmp_path / "not-a-breed" / "b.jpg").write_bytes(colour_photo((0, 200, 0)))
    dataset = data.find_dataset(tmp_path)
    assert dataset.classes == ["n02085620-Chihuahua"]
    assert [p.relative_path for p in dataset.photos] == ["n02085620-Chihuahua/a.jpg"]
    with pytest.raises(ValueError, match="no photos"):
        data.find_dataset(tmp_path / "not-a-breed")


def test_breed_filter_by_folder_or_synset():
    dataset = data.find_dataset(SAMPLES, breeds=["n02111889", "n02088364-beagle"])
    assert dataset.classes == ["n02088364-beagle", "n02111889-Samoyed"]


def test_stratified_split_is_seeded_disjoint_and_per_breed():
    dataset = data.find_dataset(SAMPLES)
    a = data.stratified_split(dataset, val=0.2, test=0.2, seed=1)
    b = data.stratified_split(dataset, val=0.2, test=0.2, seed=1)
    c = data.stratified_split(dataset, val=0.2, test=0.2, seed=2)
    assert a == b and a.test != c.test
    parts = [set(a.train), set(a.val), set(a.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(len(p) for p in parts) == len(dataset.photos)
    per_breed = Counter(p.split("/")[0] for p in a.test)
    assert set(per_breed) == set(dataset.classes) and all(n == 7 for n in per_breed.values())  # 36 * 0.2


def test_split_from_manifest_keeps_the_official_test_split_and_carves_val_from_train(tmp_path):
    dataset = data.find_dataset(SAMPLES)
    split = data.split_from_file(dataset, MANIFEST, val=0.1, seed=0)
    official = {line.split("\t")[0]: line.split("\t")[3] for line in MANIFEST.read_text().splitlines()[1:]}
    assert set(split.test) == {p for p, s in official.items() if s == "test"}
    assert set(split.train) | set(split.val) == {p for p, s in official.items() if s == "train"}
    assert len(split.val) == 11 * 3 and not set(split.val) & set(split.train)
    split.save(tmp_path / "split.json")
    assert data.split_from_file(dataset, tmp_path / "split.json") == split


def test_keep_breeds_with_and_restrict_to_classes():
    dataset = data.find_dataset(SAMPLES)
    assert data.keep_breeds_with(dataset, 36).classes == dataset.classes
    with pytest.raises(ValueError):
        data.keep_breeds_with(dataset, 37)
    split = data.Split("x", train=[p.relative_path for p in dataset.photos if "Samoyed" in p.folder])
    assert data.restrict_to_classes(dataset, split).classes == ["n02111889-Samoyed"]


def test_analyze_reports_sizes_modes_and_unreadable_files_with_their_code(tmp_path):
    breed = tmp_path / "n02085620-Chihuahua"
    shutil.copytree(SAMPLES / "n02111889-Samoyed", breed)
    (breed / "broken.jpg").write_bytes(colour_photo((1, 2, 3))[:200])
    (breed / "grey.png").write_bytes(colour_photo((90, 90, 90), fmt="PNG"))
    dataset = data.find_dataset(tmp_path)
    report = data.analyze(dataset, progress=False)
    assert report["photos"] == 38 and report["breeds"] == 1
    assert report["unreadable"] == [{"path": "n02085620-Chihuahua/broken.jpg", "code": "truncated",
                                     "message": report["unreadable"][0]["message"]}]
    assert report["formats"] == {"JPEG": 36, "PNG": 1} and report["modes"]["RGB"] == 37
    assert len(report["sizes"]) == 37 and report["size_summary"]["width"]["max"] <= 500


def test_load_photos_skips_unreadable_files(tmp_path):
    breed = tmp_path / "n02085620-Chihuahua"
    breed.mkdir()
    (breed / "good.jpg").write_bytes(colour_photo((200, 0, 0)))
    (breed / "bad.jpg").write_bytes(b"<html>not a photo</html>")
    dataset = data.find_dataset(tmp_path)
    loaded = data.load_photos(dataset, dataset.photos, progress=False)
    assert loaded.pixels.shape == (1, 224, 224, 3) and loaded.failures == [("n02085620-Chihuahua/bad.jpg", "not_an_image")]


@mock_aws
def test_dataset_on_s3(aws_env):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="dogs")
    for path in sorted((SAMPLES / "n02088364-beagle").glob("*.jpg"))[:3]:
        s3.put_object(Bucket="dogs", Key=f"stanford/n02088364-beagle/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket="dogs", Key="stanford/README.txt", Body=b"x")
    dataset = data.find_dataset("s3://dogs/stanford")
    assert dataset.classes == ["n02088364-beagle"] and len(dataset.photos) == 3
    loaded = data.load_photos(dataset, dataset.photos, progress=False)
    assert loaded.pixels.shape == (3, 224, 224, 3)
