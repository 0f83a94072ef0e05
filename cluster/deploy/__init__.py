"""Deployment onto Kubernetes: the Ray Serve application KubeRay runs (serve_app) and the
generator that turns a placement plan into its manifests (kuberay)."""

APP_NAME = "pdcluster"
SERVICER_FUNCTION = "cluster.api.pdcluster.v1.pdcluster_pb2_grpc.add_PDClusterServicer_to_server"
