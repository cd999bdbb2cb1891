"""A job's styles: one typed reference each, keys assigned once the job id exists, old records still read."""

from __future__ import annotations

from ham_core.jobs import Job, new_job_id
from ham_core.style_refs import StyleRef, assign_upload_keys, refs_from_record
from ham_core.styles import StyleRecord


def test_uploads_get_the_keys_of_their_place_and_library_styles_keep_theirs() -> None:
    library = StyleRecord(id="a" * 32, tenant="t", style_prompt="ink", has_image=True, image_digest="d" * 64).ref()
    refs = assign_upload_keys([StyleRef.uploaded(), library, StyleRef.uploaded("oil"), StyleRef.text("sketch")], "j1")
    assert refs == [
        StyleRef(key="inputs/j1/style.png"),
        StyleRef(key=f"styles/{'a' * 32}.png", prompt="ink", style_id="a" * 32, digest="d" * 64),
        StyleRef(key="inputs/j1/style-2.png", prompt="oil"),
        StyleRef(prompt="sketch"),
    ]


def test_a_job_record_round_trips_its_styles_and_derives_the_public_fields() -> None:
    job_id = new_job_id()
    job = Job(id=job_id, tenant="t", styles=assign_upload_keys([StyleRef.uploaded("ink")], job_id))
    back = Job.from_fields({k.encode(): v.encode() for k, v in job.to_fields().items()})
    assert back == job
    assert (back.has_style, back.style_prompt, back.style_ids) == (True, "ink", [])
    assert back.input_keys == [f"inputs/{job_id}/content.png", f"inputs/{job_id}/style.png"]


def test_records_of_the_previous_version_read_as_the_styles_they_meant() -> None:
    # One style: has_style / style_prompt, no styles field.
    assert refs_from_record({"has_style": "1", "style_prompt": "ink"}, "j1") == [
        StyleRef(key="inputs/j1/style.png", prompt="ink")
    ]
    assert refs_from_record({"has_style": "0", "style_prompt": "ink"}, "j1") == [StyleRef(prompt="ink")]
    # Several styles or a library one: untyped dicts (with a null prompt spelled out).
    old = '[{"key": "styles/s.png", "prompt": null, "style_id": "s"}, {"key": "inputs/j1/style.png", "prompt": null}]'
    assert refs_from_record({"has_style": "1", "styles": old}, "j1") == [
        StyleRef.library("s", key="styles/s.png"),
        StyleRef(key="inputs/j1/style.png"),
    ]
