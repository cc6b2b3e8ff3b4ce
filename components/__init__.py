"""Kubeflow Pipelines components: one per stage, each a thin door onto `tasn <stage>`.

Every component is a lightweight Python component whose body runs `tasn <stage>` in the project
image (see `components.runtime`), so the same component runs in a cluster and under
`kfp.local.SubprocessRunner`, which accepts nothing else. The pipeline overrides the image per
task (`set_container_image`), so `TASN_IMAGE` is only the default the compiled YAML carries.
"""

TASN_IMAGE = "registry.example.com/ml/tasn:0.1.0-cuda13.0"  # infra/docker/Dockerfile, as infra/k8s names it
