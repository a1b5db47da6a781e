"""What users start: the offline LLM, handles on a running cluster, and the Serve application."""
from cluster.client import connect
from cluster.llm import LLM
from replicas.outputs import CompletionOutput, Logprob, RequestOutput
from replicas.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "connect"]
