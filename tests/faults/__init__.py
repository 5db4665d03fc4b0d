"""Fault injection for the README's main job (the torchft / torchelastic pattern), used by
tests/integration/test_faults_*.py: :mod:`faults.worker` runs examples/train_gpt.py with faults injected at chosen
ranks and steps, :mod:`faults.common` launches it under ds-launch (or bare) and reads back what happened. The soak
(bench/soak_main_job.py) uses the same worker."""
