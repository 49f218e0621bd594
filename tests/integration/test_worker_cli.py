"""dogbreeds-worker predict / classify on a tiny trained model."""

from __future__ import annotations

import hashlib
import json

import boto3
from click.testing import CliRunner

from tests.conftest import COLOUR_BREEDS, colour_photo
from worker.cli import main


def photos_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLOUR_BREEDS.items()):
        (folder / f"{name}.jpg").write_bytes(colour_photo(rgb, seed=i))
    (folder / "sub" / "samoyed.png").write_bytes(colour_photo(COLOUR_BREEDS["n02111889-Samoyed"], fmt="PNG"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "readme.txt").write_text("ignored: not a photo suffix")
    return folder


def test_predict_prints_a_table_and_reports_bad_files_without_crashing(tmp_path, colour_artifact):
    folder = photos_folder(tmp_path)
    result = CliRunner().invoke(main, ["predict", "--model", str(colour_artifact), str(folder)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0].rsplit("/", 1)[-1]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "Chihuahua" in lines["n02085620-Chihuahua.jpg"] and "beagle" in lines["n02088364-beagle.jpg"]
    assert "Samoyed" in lines["samoyed.png"]
    assert "ERROR" in lines["broken.jpg"] and "readme.txt" not in lines


def test_predict_json_lines_with_top_k(tmp_path, colour_artifact):
    folder = photos_folder(tmp_path)
    result = CliRunner().invoke(main, ["predict", "--model", str(colour_artifact), "--json", "--top-k", "2",
                                       str(folder / "n02111889-Samoyed.jpg"), str(folder / "broken.jpg"),
                                       str(folder / "missing.jpg")])
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["breed"] == "Samoyed" and rows[0]["synset"] == "n02111889" and len(rows[0]["top_k"]) == 2
    assert rows[0]["top_k"][0]["score"] >= rows[0]["top_k"][1]["score"]
    assert rows[1]["status"] == "error" and rows[1]["error_code"] in ("truncated", "corrupt")
    assert rows[2]["error_code"] == "unreadable_file"


def test_classify_a_local_folder_writes_one_manifest(tmp_path, colour_artifact):
    folder = photos_folder(tmp_path)
    out = tmp_path / "manifest.json"
    result = CliRunner().invoke(main, ["classify", "--model", str(colour_artifact), str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["counts"] == {"ok": 4, "error": 1, "no_dog": 0, "uncertain": 0}
    by_key = {item["key"]: item for item in doc["items"]}
    assert by_key["sub/samoyed.png"]["breed"] == "Samoyed"
    assert by_key["broken.jpg"]["status"] == "error"
    digest = hashlib.sha256((colour_artifact / "manifest.json").read_bytes()).hexdigest()
    assert doc["model"] == {"name": "colours", "version": "v1", "runtime": "tf", "manifest_sha256": digest}


def test_classify_an_s3_prefix_writes_the_manifest_to_s3(moto_server, colour_artifact):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    for name, rgb in COLOUR_BREEDS.items():
        s3.put_object(Bucket="photos", Key=f"batch/{name}.jpg", Body=colour_photo(rgb))
    result = CliRunner().invoke(main, ["classify", "--model", str(colour_artifact), "--job-id", "b1", "s3://photos/batch"])
    assert result.exit_code == 0, result.output
    doc = json.loads(s3.get_object(Bucket="photos", Key="manifests/b1.json")["Body"].read())
    assert {i["key"].split("/")[1].split(".")[0].split("-", 1)[1]: i["breed"] for i in doc["items"]} == {
        "Chihuahua": "Chihuahua", "Samoyed": "Samoyed", "beagle": "beagle"}
