"""kubedistill operator: reconciles DistillJob resources into KubeRay RayJobs."""
