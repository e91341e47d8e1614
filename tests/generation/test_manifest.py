"""Output names (lora.generation.manifest): safe, short file names from any prompt."""

from __future__ import annotations

from tests.helpers import request


def test_slugs_are_safe_and_short():
    from lora.generation.manifest import output_names, slugify

    assert slugify("Hip Hop 808 beat, with TRAP drums!!") == "hip-hop-808-beat-with-trap-drums"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("🎵🎶") == ""
    assert len(slugify("日本語の音楽 " * 40).encode("utf-8")) <= 80
    names = output_names([request("a b", 0), request("a-b", 0), request("🎵", 1), request("", 2)])
    assert names[0] != names[1] and names[0].startswith("a-b-") and names[2].startswith("prompt-")
    assert names[3] == "unconditional_s2.wav"
    assert all("/" not in n for n in names)
