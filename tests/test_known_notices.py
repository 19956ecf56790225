"""Contract of the silenced notices (`KNOWN_NOTICES`, megatron_gvpo/utils/logging.py): each is ignored in our
processes (`silence_known_notices`) and in an SGLang server's (`known_notices_env`, PYTHONWARNINGS) when it comes
from the module that emits it, and only then: the same text from another module, another category or any other
warning still shows. That the real runs print none of them (terminal and SGLang log) and still show a genuine
warning is checked on the online runs of test_online.py (`tests.processes.assert_quiet`)."""

import os
import subprocess
import sys
import warnings

import pytest

from megatron_gvpo.utils.logging import KNOWN_NOTICES, known_notices_env, silence_known_notices

CASES = [(n.message, n.category, module, n.cpu_only) for n in KNOWN_NOTICES for module in n.modules or ("any.module",)]


def emitted(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_notices()
        silence_known_notices(cpu=True)
        warnings.warn_explicit(message + " (and the rest of it)", category, "f.py", 1, module=module)
    return bool(caught)


@pytest.mark.parametrize("message, category, module, cpu_only", CASES)
def test_each_notice_is_ignored_from_its_module_only(message, category, module, cpu_only):
    assert not emitted(message, category, module)
    assert emitted(message, category, "someone.else") or module == "any.module"
    assert emitted(message, DeprecationWarning, module)  # not a UserWarning / FutureWarning subclass
    assert emitted("A genuine warning", category, module)


def test_pythonwarnings_carries_every_notice_and_nothing_else():
    """The PYTHONWARNINGS of an SGLang server (commas and colons are its separators): a child Python ignores each
    notice from its module (the CPU-only ones only with cpu=True) and prints a genuine warning; an entry the user
    set comes last, so it wins."""
    assert all("," not in n.message and ":" not in n.message for n in KNOWN_NOTICES)
    script = ("import builtins, sys, warnings\n"
              "for i, (m, c, mod) in enumerate(eval(sys.argv[1])):\n"
              "    warnings.warn_explicit(m + ' (and the rest of it)', getattr(builtins, c), 'f.py', i, module=mod)\n"
              "warnings.warn('A genuine warning')\n")
    for cpu in (False, True):
        cases = [(m, c.__name__, mod) for m, c, mod, cpu_only in CASES if cpu or not cpu_only]
        env = {**os.environ, "PYTHONWARNINGS": known_notices_env({}, cpu=cpu)}
        err = subprocess.run([sys.executable, "-c", script, repr(cases)], env=env, capture_output=True, text=True,
                             check=True).stderr
        assert "Invalid -W option" not in err and "(and the rest of it)" not in err, err
        assert "UserWarning: A genuine warning" in err
    gpu = known_notices_env({"PYTHONWARNINGS": "error"}, cpu=False)
    assert gpu.endswith(",error") and "CUDA_DEVICE_MAX_CONNECTIONS" not in gpu and "Only CUDA" not in gpu
