{{/* Names, labels, addresses and the pod pieces every component shares. */}}

{{- define "fastserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix. 40 characters leave room for the longest suffix ("-worker-headless")
     and for the StatefulSet controller-revision-hash label ("<name>-worker-<10>" within 63). */}}
{{- define "fastserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fastserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the whole release (no component): NetworkPolicy peers use them. */}}
{{- define "fastserve.releaseSelector" -}}
app.kubernetes.io/name: {{ include "fastserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "worker"). */}}
{{- define "fastserve.selectorLabels" -}}
{{ include "fastserve.releaseSelector" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of one component's resources: (dict "root" $ "component" "worker"). */}}
{{- define "fastserve.labels" -}}
helm.sh/chart: {{ include "fastserve.chart" .root }}
{{ include "fastserve.selectorLabels" . }}
app.kubernetes.io/part-of: fastserve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* The discovery selector of a component, as "k=v,k=v". */}}
{{- define "fastserve.selectorString" -}}
{{- $labels := include "fastserve.selectorLabels" . | fromYaml }}
{{- $pairs := list }}
{{- range $key := keys $labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (get $labels $key)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "fastserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-scheduler" (include "fastserve.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image of a component: (dict "root" $ "override" .Values.workers.image) or just $. */}}
{{- define "fastserve.image" -}}
{{- $root := .root | default . }}
{{- $override := .override | default dict }}
{{- $repository := $override.repository | default $root.Values.image.repository }}
{{- $tag := $override.tag | default $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* "<namespace>.svc.<cluster domain>": addresses are fully qualified, whatever the resolver. */}}
{{- define "fastserve.namespaceDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "fastserve.schedulerAddress" -}}
{{- printf "%s-scheduler.%s:%d" (include "fastserve.fullname" .) (include "fastserve.namespaceDomain" .) (.Values.scheduler.port | int) }}
{{- end }}

{{- define "fastserve.kvstoreAddress" -}}
{{- printf "%s-kvstore.%s:%d" (include "fastserve.fullname" .) (include "fastserve.namespaceDomain" .) (.Values.kvstore.port | int) }}
{{- end }}

{{- define "fastserve.workerHeadless" -}}
{{- printf "%s-worker-headless" (include "fastserve.fullname" .) }}
{{- end }}

{{/* Stable DNS name of stage $stage: (dict "root" $ "stage" 0). */}}
{{- define "fastserve.workerHost" -}}
{{- printf "%s-worker-%d.%s.%s" (include "fastserve.fullname" .root) (.stage | int) (include "fastserve.workerHeadless" .root) (include "fastserve.namespaceDomain" .root) }}
{{- end }}

{{/* The scheduler's static --worker-address: stage 0's stable DNS name (Kubernetes discovery
     finds every stage by label). */}}
{{- define "fastserve.workerAddress" -}}
{{- printf "%s:%d" (include "fastserve.workerHost" (dict "root" . "stage" 0)) (.Values.workers.port | int) }}
{{- end }}

{{/* Where the kvstore and the workers of a node both see the node's shared-memory directory
     (the same path in both: a client opens the files by the store's names). */}}
{{- define "fastserve.sharedShmDir" -}}
/var/run/fastserve/shm
{{- end }}

{{/* The node directory shared for the fast path, or "" when it is not shared. */}}
{{- define "fastserve.shmHostPath" -}}
{{- if .Values.kvstore.sharedMemory.enabled }}
{{- .Values.kvstore.sharedMemory.hostPath }}
{{- end }}
{{- end }}

{{- define "fastserve.redisUrl" -}}
{{- if eq .Values.redis.mode "external" }}
{{- if .Values.redis.external.existingSecret }}
{{- print "$(KVSTORE_BACKEND_URL)" }}
{{- else }}
{{- required "redis.external.url is required with redis.mode=external" .Values.redis.external.url }}
{{- end }}
{{- else if eq .Values.redis.mode "bundled" }}
{{- printf "redis://%s-redis.%s:%d/%d" (include "fastserve.fullname" .) (include "fastserve.namespaceDomain" .) (.Values.redis.bundled.port | int) (.Values.redis.db | int) }}
{{- else }}
{{- fail (printf "redis.mode must be bundled or external, not %q" .Values.redis.mode) }}
{{- end }}
{{- end }}

{{/* --model for the frontend and the workers. */}}
{{- define "fastserve.modelArg" -}}
{{- if eq .Values.model.source "image" }}
{{- .Values.model.name }}
{{- else if has .Values.model.source (list "pvc" "hostPath") }}
{{- if .Values.model.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- else }}
{{- fail (printf "model.source must be image, pvc or hostPath, not %q" .Values.model.source) }}
{{- end }}
{{- end }}

{{- define "fastserve.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required with model.source=hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- end }}

{{- define "fastserve.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Writable scratch for a read-only root filesystem: /tmp and the user's cache. */}}
{{- define "fastserve.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end }}

{{- define "fastserve.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /home/fastserve/.cache
{{- end }}

{{/* Pod-level settings shared by every FastServe pod.
     NOTE: enableServiceLinks is off because Kubernetes would otherwise inject variables such as
     FASTSERVE_PORT=tcp://... for a Service named "fastserve", and every FASTSERVE_<FLAG>
     variable is read as that flag's value. */}}
{{- define "fastserve.podDefaults" -}}
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Scheduling constraints of one component: (dict "values" .Values.frontend). */}}
{{- define "fastserve.placement" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A gRPC health probe on the service's port (the overall "" service). */}}
{{- define "fastserve.grpcProbe" -}}
grpc:
  port: {{ .port | int }}
periodSeconds: {{ .period | default 10 }}
timeoutSeconds: 5
failureThreshold: {{ .failures | default 3 }}
{{- end }}
