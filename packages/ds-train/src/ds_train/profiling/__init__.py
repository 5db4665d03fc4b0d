"""DeepSpeed's ``deepspeed.profiling``: the FLOPs profiler (:mod:`ds_train.profiling.flops_profiler`)."""

from .flops_profiler import (FlopsProfiler, ModuleProfile, duration_to_string, flops_to_string, get_model_profile,
                             macs_to_string, number_to_string, params_to_string)

__all__ = ["FlopsProfiler", "ModuleProfile", "get_model_profile", "number_to_string", "macs_to_string",
           "flops_to_string", "params_to_string", "duration_to_string"]
