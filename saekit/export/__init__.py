"""Exports of saekit SAEs to the layouts other tools read: Neuronpedia's dashboard batches,
circuit-tracer's transcoder sets, and SAELens's folders (saekit's own format)."""

from saekit.export.circuit_tracer import export_circuit_tracer
from saekit.export.neuronpedia import export_neuronpedia
from saekit.export.saelens import export_saelens

__all__ = ["export_circuit_tracer", "export_neuronpedia", "export_saelens"]
