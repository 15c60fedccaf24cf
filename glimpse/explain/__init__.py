"""Explanations: where a model looked (glimpse.explain.core), the methods' equations (relevance), the
explainers of glimpse's parts (explainers), heatmap images (render) and the check against the shapes
world's boxes (evaluate)."""

from glimpse.explain.core import DEFAULT_METHOD, METHODS, Explanation, explain

__all__ = ["DEFAULT_METHOD", "METHODS", "Explanation", "explain"]
