"""Deployment files: docker-compose.yml, deploy/ (Dockerfiles, Kubernetes, health check)."""
