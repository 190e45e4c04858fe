"""Test support, one module per kind of help; tests import them by their own names (conftest puts this
folder on sys.path), e.g. `import kubeemu`, `import tiny`, `from support import jobs`:

- `jobs`: the one factory of PostTrainingJob documents, and the adapter settings tests share;
- `tiny`: tiny random models with an offline-trained tokenizer, and their data;
- `kubeemu*`: the Kubernetes API emulator (kmock plus our fidelity layer), `opcluster`: helpers over it
  for operator tests (claims, pods, Events, faults);
- `clusterbox*`: the cluster in a box: a rendered RayJob's pods as real Ray nodes, each in its own
  mount namespace, with KubeRay played against the emulator.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
