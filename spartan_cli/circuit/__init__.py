"""Task circuits: the component graph, edge attribution (EAP, EAP-IG), selection and faithfulness.

A notebook session, three lines per step::

    scored = attribute(model, batches, metric=logit_diff, method="eap-ig-inputs", ig_steps=5)  # every edge
    curve = sweep(model, batches, metric=logit_diff, graph=scored, selection="greedy")  # F against edges
    circuit = select(scored, curve.point_for(0.9).requested, how="greedy")  # the smallest circuit with F >= 0.9

Modules: ``graph`` (nodes, edges, JSON, networkx), ``anatomy`` (per-architecture block pieces),
``wiring`` (the model run with every edge a separate wire), ``taps`` (record, patch and gradient runs,
with an optional position axis), ``contrast`` (clean/corrupted batches and metrics), ``curve`` (faithfulness
curves, shared by both levels), ``attribute``, ``select``, ``faithfulness``; token level: ``tokens``,
``token_patching``; the search that drives either level: ``driver``, ``discovery``, ``token_discovery``.
"""

from spartan_cli.circuit.attribute import METHODS, AttributionStep, attribute
from spartan_cli.circuit.contrast import Contrast, ContrastBatch, Metric
from spartan_cli.circuit.faithfulness import evaluate, exact_scores, sweep
# after the module of the same name: the package attribute ``faithfulness`` is the function
from spartan_cli.circuit.curve import (MIB_FRACTIONS, Curve, CurvePoint, Evaluation, EvaluationStep,  # noqa: I001
                                       faithfulness, fraction_grid, log_grid)
from spartan_cli.circuit.graph import Edge, Graph, Node, edge_count, to_networkx
from spartan_cli.circuit.select import SELECTIONS, greedy, prune, select, threshold, topn
from spartan_cli.circuit.wiring import Tap, Wiring, wired

__all__ = [
    "METHODS", "SELECTIONS", "MIB_FRACTIONS", "AttributionStep", "Contrast", "ContrastBatch", "Curve",
    "CurvePoint", "Edge", "Evaluation", "EvaluationStep", "Graph", "Metric", "Node", "Tap", "Wiring", "attribute",
    "edge_count", "evaluate", "exact_scores", "faithfulness", "fraction_grid", "greedy", "log_grid", "prune",
    "select", "sweep", "threshold", "to_networkx", "topn", "wired",
]
