"""fgq_jax.results: provenance of results (git revision, metadata) and result-file helpers."""
from __future__ import annotations

import re

from fgq_jax import results


def test_git_revision_here_and_outside_a_checkout(tmp_path):
    rev = results.git_revision()
    assert rev is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", rev)  # a tarball install has no git
    assert results.git_revision(tmp_path) is None
    assert results.run_metadata(seed=1)["git_revision"] == (rev or "unknown")


def test_act_bits_order():
    assert sorted(["4", "fp", "2", "8"], key=results.act_bits_order) == ["fp", "8", "4", "2"]
