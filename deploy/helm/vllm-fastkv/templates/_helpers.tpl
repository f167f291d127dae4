{{/* Chart name, overridable (nameOverride). */}}
{{- define "vllm-fastkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name: release-chart, or the release name alone when it already contains the chart
name. Truncated to 63 characters, the DNS label limit that Service names must meet.
*/}}
{{- define "vllm-fastkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vllm-fastkv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods: stable across upgrades (selectors are immutable). */}}
{{- define "vllm-fastkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-fastkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-fastkv.labels" -}}
helm.sh/chart: {{ include "vllm-fastkv.chart" . }}
{{ include "vllm-fastkv.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end }}

{{/* The model name clients send in requests. */}}
{{- define "vllm-fastkv.servedModelName" -}}
{{- default .Values.model.name .Values.model.servedModelName }}
{{- end }}

{{/* Whether an optional scalar value is set: 0 counts as set, null and "" do not. */}}
{{- define "vllm-fastkv.isSet" -}}
{{- if not (or (kindIs "invalid" .) (eq (toString .) "")) }}true{{ end }}
{{- end }}

{{/*
The FastKV knobs as VLLM_FASTKV_* variables, which the plugin reads and validates itself.
tspLayer is left out when empty so the plugin picks the model's middle layer.
*/}}
{{- define "vllm-fastkv.fastkvEnv" -}}
{{- $f := .Values.fastkv -}}
- name: VLLM_FASTKV_ENABLED
  value: {{ $f.enabled | quote }}
{{- if include "vllm-fastkv.isSet" $f.tspLayer }}
- name: VLLM_FASTKV_TSP_LAYER
  value: {{ $f.tspLayer | quote }}
{{- end }}
- name: VLLM_FASTKV_TSP_RATE
  value: {{ $f.tspRate | quote }}
- name: VLLM_FASTKV_RETAIN_RATE
  value: {{ $f.retainRate | quote }}
- name: VLLM_FASTKV_WINDOW
  value: {{ $f.window | quote }}
- name: VLLM_FASTKV_POOL_KERNEL
  value: {{ $f.poolKernel | quote }}
- name: VLLM_FASTKV_POOLING
  value: {{ $f.pooling | quote }}
- name: VLLM_FASTKV_MODE
  value: {{ $f.mode | quote }}
- name: VLLM_FASTKV_MAX_CAPACITY_PROMPT
  value: {{ $f.maxCapacityPrompt | quote }}
- name: VLLM_FASTKV_TSP_LEN
  value: {{ $f.tspLen | quote }}
{{- if include "vllm-fastkv.isSet" $f.tspBufferTokens }}
- name: VLLM_FASTKV_TSP_BUFFER_TOKENS
  value: {{ $f.tspBufferTokens | quote }}
{{- end }}
- name: VLLM_FASTKV_KV_BITS
  value: {{ $f.kvBits | quote }}
- name: VLLM_FASTKV_KV_GROUP_SIZE
  value: {{ $f.kvGroupSize | quote }}
- name: VLLM_FASTKV_KV_RESIDUAL
  value: {{ $f.kvResidual | quote }}
- name: VLLM_FASTKV_EVICTED_BITS
  value: {{ $f.evictedBits | quote }}
- name: VLLM_FASTKV_SELECTION
  value: {{ $f.selection | quote }}
{{- end }}

{{/* Name of the model cache claim: the user's existing claim or the one this chart creates. */}}
{{- define "vllm-fastkv.cacheClaimName" -}}
{{- default (printf "%s-model-cache" (include "vllm-fastkv.fullname" .)) .Values.modelCache.pvc.existingClaim }}
{{- end }}

{{/* Fails the render on value combinations that the schema cannot express. */}}
{{- define "vllm-fastkv.validate" -}}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa and autoscaling.keda are exclusive: KEDA creates its own HorizontalPodAutoscaler for the Deployment" }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled (gt (int .Values.autoscaling.hpa.minReplicas) (int .Values.autoscaling.hpa.maxReplicas)) }}
{{- fail "autoscaling.hpa.minReplicas must not exceed autoscaling.hpa.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.keda.enabled (gt (int .Values.autoscaling.keda.minReplicaCount) (int .Values.autoscaling.keda.maxReplicaCount)) }}
{{- fail "autoscaling.keda.minReplicaCount must not exceed autoscaling.keda.maxReplicaCount" }}
{{- end }}
{{- end }}
