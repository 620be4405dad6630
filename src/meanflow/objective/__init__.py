"""Training objectives: MeanFlow (average velocity), improved MeanFlow (iMF) and the
flow-matching baseline."""

from meanflow.objective.flow_matching import FlowMatchingLoss
from meanflow.objective.imf_loss import (IMF_VARIANTS, JVP_VELOCITIES, IMFLoss,
                                         effective_guidance_scale, guidance_scale_cdf,
                                         imf_guided_velocity, sample_guidance_interval,
                                         sample_guidance_scale)
from meanflow.objective.jvp import (JVP_CHOICES, JVP_STRATEGIES, TANGENTS, JVPStrategy,
                                    resolve_jvp, time_derivative, u_and_dudt)
from meanflow.objective.meanflow_loss import (MeanFlowLoss, adaptive_weight, average_velocity,
                                              guided_velocity)
from meanflow.objective.time_sampler import ROW_LAYOUTS, TIME_SAMPLERS, TimeSampler

__all__ = ["MeanFlowLoss", "FlowMatchingLoss", "TimeSampler", "TIME_SAMPLERS", "ROW_LAYOUTS",
           "JVP_STRATEGIES", "JVP_CHOICES", "TANGENTS", "JVPStrategy", "resolve_jvp",
           "time_derivative", "u_and_dudt", "average_velocity", "guided_velocity",
           "adaptive_weight", "IMFLoss", "IMF_VARIANTS", "JVP_VELOCITIES",
           "sample_guidance_scale", "guidance_scale_cdf", "sample_guidance_interval",
           "effective_guidance_scale", "imf_guided_velocity"]
