"""visae.machine: the machine record benchmarks print next to their figures."""

import os

import torch

from visae.machine import describe_machine, machine_info


def test_machine_record_names_this_machine():
    m = machine_info()
    assert m["cores"] == os.cpu_count() and m["torch"] == torch.__version__
    assert m["torch_threads"] == torch.get_num_threads() and m["cpu"]
    assert (m["cuda"] is None) == (not torch.cuda.is_available())
    line = describe_machine()
    assert f"{os.cpu_count()} cores" in line and torch.__version__ in line
