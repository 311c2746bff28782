"""The bad-input corpus (issue 6): every row of ``cases_*.py`` through the real CLI.

Each row must exit with its documented code (0 ok, 1 invalid input, 2 usage/IO), print one
line on stderr naming the file and what to do, show no traceback, leave no output or temp file
behind and leave every input byte-identical. See ``corpus.py`` for how to add rows.
"""
import pytest

from .corpus import Env, all_cases, build_shared, run_case

CASES = all_cases()


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    return build_shared(tmp_path_factory.mktemp("corpus-shared"))


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, shared, tmp_path):
    run_case(case, Env(tmp_path, shared))
