{{/* Names ----------------------------------------------------------------------------------------- */}}

{{- define "lgw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lgw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", refused when longer than a DNS label (no silent truncation: names would clash). */}}
{{- define "lgw.componentName" -}}
{{- $root := index . 0 -}}
{{- $name := printf "%s-%s" (include "lgw.fullname" $root) (index . 1) -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "the object name %q is longer than 63 characters: use a shorter release name, fullnameOverride or backend name" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "lgw.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: (list $ "component") */}}
{{- define "lgw.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "lgw.chart" $root }}
{{ include "lgw.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: lora-gateway
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "lgw.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "lgw.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "lgw.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag | toString) -}}
{{- end -}}

{{- define "lgw.gatewayServiceAccount" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "lgw.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lgw.workerServiceAccount" -}}
{{- if .Values.worker.serviceAccount.create -}}
{{- default (include "lgw.componentName" (list . "worker")) .Values.worker.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.worker.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lgw.k8sNamespace" -}}
{{- default .Release.Namespace .Values.worker.kubernetes.namespace -}}
{{- end -}}

{{- define "lgw.sharedClaim" -}}
{{- default (include "lgw.componentName" (list . "shared")) .Values.sharedVolume.existingClaim -}}
{{- end -}}

{{- define "lgw.vllmName" -}}
{{- include "lgw.componentName" (list (index . 0) (printf "vllm-%s" (index . 1).name)) -}}
{{- end -}}

{{- define "lgw.vllmUrl" -}}
{{- $root := index . 0 -}}
{{- printf "http://%s.%s.svc:%d" (include "lgw.vllmName" .) $root.Release.Namespace (int $root.Values.vllm.port) -}}
{{- end -}}

{{/* Secrets and where each value comes from ---------------------------------------------------------- */}}

{{/* The chart's own Secret: made unless every value comes from Secrets of the user's. */}}
{{- define "lgw.secretName" -}}
{{- include "lgw.fullname" . -}}
{{- end -}}

{{- define "lgw.makesSecret" -}}
{{- if or (not .Values.auth.existingSecret) .Values.externalDatabase.url .Values.externalRedis.url .Values.postgresql.enabled -}}
true
{{- end -}}
{{- end -}}

{{- define "lgw.authSecretName" -}}
{{- default (include "lgw.secretName" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* (list $ "adminApiKey" | "metricsToken" | "vllmApiKey"): the key in the auth Secret. */}}
{{- define "lgw.authKey" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.auth.existingSecret -}}
{{- index $root.Values.auth.secretKeys (index . 1) -}}
{{- else -}}
{{- index (dict "adminApiKey" "GATEWAY_ADMIN_API_KEY" "metricsToken" "GATEWAY_METRICS_TOKEN" "vllmApiKey" "VLLM_API_KEY") (index . 1) -}}
{{- end -}}
{{- end -}}

{{/* Where the database is: url | secret | postgresql | sqlite (refused: more than one). */}}
{{- define "lgw.databaseMode" -}}
{{- $modes := list -}}
{{- if .Values.externalDatabase.url }}{{ $modes = append $modes "url" }}{{ end -}}
{{- if .Values.externalDatabase.existingSecret }}{{ $modes = append $modes "secret" }}{{ end -}}
{{- if .Values.postgresql.enabled }}{{ $modes = append $modes "postgresql" }}{{ end -}}
{{- if gt (len $modes) 1 -}}
{{- fail "set one of externalDatabase.url, externalDatabase.existingSecret and postgresql.enabled, not several" -}}
{{- end -}}
{{- if $modes }}{{ first $modes }}{{ else }}sqlite{{ end -}}
{{- end -}}

{{/* Whether the database lives in the release (then the first migration runs post-install). */}}
{{- define "lgw.databaseInRelease" -}}
{{- $mode := include "lgw.databaseMode" . -}}
{{- if or (eq $mode "postgresql") (eq $mode "sqlite") }}true{{ end -}}
{{- end -}}

{{- define "lgw.redisMode" -}}
{{- $modes := list -}}
{{- if .Values.externalRedis.url }}{{ $modes = append $modes "url" }}{{ end -}}
{{- if .Values.externalRedis.existingSecret }}{{ $modes = append $modes "secret" }}{{ end -}}
{{- if .Values.redis.enabled }}{{ $modes = append $modes "redis" }}{{ end -}}
{{- if gt (len $modes) 1 -}}
{{- fail "set one of externalRedis.url, externalRedis.existingSecret and redis.enabled, not several" -}}
{{- end -}}
{{- if $modes }}{{ first $modes }}{{ end -}}
{{- end -}}

{{- define "lgw.databaseEnv" -}}
{{- $mode := include "lgw.databaseMode" . -}}
{{- if eq $mode "secret" -}}
- name: GATEWAY_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.externalDatabase.existingSecret | quote }}, key: {{ .Values.externalDatabase.existingSecretKey | quote }}}
{{- else if ne $mode "sqlite" -}}
- name: GATEWAY_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ include "lgw.secretName" . | quote }}, key: GATEWAY_DATABASE_URL}
{{- end }}
{{- end -}}

{{- define "lgw.redisEnv" -}}
{{- $mode := include "lgw.redisMode" . -}}
{{- if eq $mode "secret" -}}
- name: GATEWAY_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.externalRedis.existingSecret | quote }}, key: {{ .Values.externalRedis.existingSecretKey | quote }}}
{{- else if eq $mode "url" -}}
- name: GATEWAY_REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ include "lgw.secretName" . | quote }}, key: GATEWAY_REDIS_URL}
{{- else if eq $mode "redis" -}}
- name: GATEWAY_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "lgw.componentName" (list . "redis")) | quote }}
{{- end }}
{{- end -}}

{{/* GATEWAY_* the chart sets itself: refused in env maps (they would be silently overridden or clash). */}}
{{- define "lgw.reservedEnv" -}}
{{- list "GATEWAY_DATABASE_URL" "GATEWAY_REDIS_URL" "GATEWAY_ADMIN_API_KEY" "GATEWAY_METRICS_TOKEN" "GATEWAY_DATA_DIR" "GATEWAY_ADAPTER_STORE" "GATEWAY_BACKEND_ADAPTER_ROOT" "GATEWAY_ARTIFACT_STORE" "GATEWAY_DEPLOYMENT_ARTIFACT_ROOT" "GATEWAY_HOST" "GATEWAY_PORT" "GATEWAY_DRAIN_S" "GATEWAY_SHUTDOWN_GRACE_S" "GATEWAY_K8S_NAMESPACE" "GATEWAY_K8S_MODEL_PVC" "GATEWAY_K8S_MODEL_MOUNT_PATH" "GATEWAY_K8S_IMAGE" "GATEWAY_K8S_WORKER_IMAGE" "GATEWAY_K8S_GPU_RESOURCE" "GATEWAY_K8S_NODE_SELECTOR" "GATEWAY_K8S_TOLERATIONS" "GATEWAY_K8S_LABELS" "GATEWAY_K8S_IMAGE_PULL_SECRETS" "GATEWAY_K8S_SERVICE_ACCOUNT" "GATEWAY_K8S_RUN_AS_USER" "GATEWAY_K8S_STEPS" "GATEWAY_K8S_STEP_PATH_MAP" | toJson -}}
{{- end -}}

{{/* (list $ map "where"): env entries of a name -> value map, refusing the chart's own names. */}}
{{- define "lgw.extraEnv" -}}
{{- $root := index . 0 -}}
{{- $reserved := include "lgw.reservedEnv" $root | fromJsonArray -}}
{{- $out := list -}}
{{- range $name, $value := index . 1 -}}
{{- if has $name $reserved -}}
{{- fail (printf "%s: %s is set by the chart (see values.yaml for the value that sets it)" (index $ 2) $name) -}}
{{- end -}}
{{- $out = append $out (dict "name" $name "value" ($value | toString)) -}}
{{- end -}}
{{- if $out }}{{ toYaml $out }}{{ end -}}
{{- end -}}

{{/* What the gateway and the worker share: paths on the shared volume and the database. */}}
{{- define "lgw.commonEnv" -}}
{{- $mount := .Values.sharedVolume.mountPath -}}
- name: GATEWAY_DATA_DIR
  value: {{ $mount | quote }}
- name: GATEWAY_ADAPTER_STORE
  value: {{ printf "%s/adapters" $mount | quote }}
- name: GATEWAY_BACKEND_ADAPTER_ROOT
  value: {{ printf "%s/adapters" $mount | quote }}
- name: GATEWAY_ARTIFACT_STORE
  value: {{ printf "%s/artifacts" $mount | quote }}
- name: GATEWAY_DEPLOYMENT_ARTIFACT_ROOT
  value: {{ printf "%s/artifacts" $mount | quote }}
- name: HOME
  value: /tmp
{{- with include "lgw.databaseEnv" . }}
{{ . }}
{{- end }}
{{- end -}}

{{- define "lgw.sharedVolume" -}}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "lgw.sharedClaim" . }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "lgw.sharedMounts" -}}
- name: shared
  mountPath: {{ .Values.sharedVolume.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Checks that apply to the whole release; included once by the gateway Deployment. */}}
{{- define "lgw.validate" -}}
{{- $redis := include "lgw.redisMode" . -}}
{{- $db := include "lgw.databaseMode" . -}}
{{- $g := .Values.gateway -}}
{{- if and (not $redis) (gt (int $g.replicas) 1) -}}
{{- fail (printf "gateway.replicas is %d but no Redis is configured: several gateway replicas need GATEWAY_REDIS_URL (set externalRedis.url, externalRedis.existingSecret or redis.enabled), else each keeps its own residency state and they load and evict adapters under each other" (int $g.replicas)) -}}
{{- end -}}
{{- if and (not $redis) $g.autoscaling.enabled -}}
{{- fail "gateway.autoscaling.enabled needs Redis: several gateway replicas need GATEWAY_REDIS_URL (set externalRedis.url, externalRedis.existingSecret or redis.enabled)" -}}
{{- end -}}
{{- if and (not $redis) (gt (int $g.workers) 1) -}}
{{- fail "gateway.workers > 1 needs Redis (GATEWAY_REDIS_URL): set externalRedis.url, externalRedis.existingSecret or redis.enabled" -}}
{{- end -}}
{{- if and (eq $db "sqlite") (or (gt (int $g.replicas) 1) $g.autoscaling.enabled (gt (int $g.workers) 1)) -}}
{{- fail "no database is configured (SQLite on the shared volume), which serves one gateway process only: set externalDatabase.url, externalDatabase.existingSecret or postgresql.enabled" -}}
{{- end -}}
{{- if and $g.autoscaling.enabled (lt (int $g.autoscaling.maxReplicas) (int $g.autoscaling.minReplicas)) -}}
{{- fail "gateway.autoscaling.maxReplicas must be >= minReplicas" -}}
{{- end -}}
{{- if and .Values.auth.adminApiKey (lt (len .Values.auth.adminApiKey) 16) -}}
{{- fail "auth.adminApiKey must be at least 16 characters" -}}
{{- end -}}
{{- $grace := include "lgw.gatewayGrace" . | int -}}
{{- $need := include "lgw.gatewayGraceNeeded" . | int -}}
{{- if lt $grace $need -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds %d is shorter than preStopSleepSeconds + drainSeconds + shutdownGraceSeconds (%d): the kubelet would kill requests still in flight" $grace $need) -}}
{{- end -}}
{{- $models := list -}}
{{- range .Values.baseModels }}{{ $models = append $models .name }}{{ end -}}
{{- $names := list -}}
{{- range .Values.vllm.backends -}}
{{- if has .name $names -}}
{{- fail (printf "vllm.backends: the name %q is used twice" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- if and (include "lgw.registers" .) (not (has .baseModel $models)) -}}
{{- fail (printf "vllm.backends[%s].baseModel %q is not one of baseModels (add it there, or set register: false and register the backend yourself)" .name .baseModel) -}}
{{- end -}}
{{- if lt (int (default .maxLoras .maxCpuLoras)) (int .maxLoras) -}}
{{- fail (printf "vllm.backends[%s]: maxCpuLoras (%d) must be >= maxLoras (%d)" .name (int .maxCpuLoras) (int .maxLoras)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lgw.gatewayGraceNeeded" -}}
{{- $g := .Values.gateway -}}
{{- addf $g.preStopSleepSeconds $g.drainSeconds $g.shutdownGraceSeconds | ceil | int -}}
{{- end -}}

{{- define "lgw.gatewayGrace" -}}
{{- $g := .Values.gateway -}}
{{- if kindIs "invalid" $g.terminationGracePeriodSeconds -}}
{{- add (include "lgw.gatewayGraceNeeded" . | int) (int $g.terminationGraceMarginSeconds) -}}
{{- else -}}
{{- int $g.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* The migration Job's hook events: pre-install unless the database is created by this release. */}}
{{- define "lgw.migrationHook" -}}
{{- if include "lgw.databaseInRelease" . -}}
post-install,pre-upgrade
{{- else -}}
pre-install,pre-upgrade
{{- end -}}
{{- end -}}

{{/* A backend: whether the registration Job registers it (register: true unless set false). */}}
{{- define "lgw.registers" -}}
{{- if ne (toString .register) "false" }}true{{ end -}}
{{- end -}}

{{/* A base model as the admin API's BaseModelCreate (JSON). Shapes: moduleShapes as given, else computed
from `shape` as app/registry/base_models.py does for Llama-style decoders, else none (the gateway reads
config.json at `path`). */}}
{{- define "lgw.baseModelCreate" -}}
{{- $m := . -}}
{{- $out := dict "name" $m.name "path" $m.path "aliases" ($m.aliases | default list) "public" (ne (toString $m.public) "false") -}}
{{- with $m.architecture }}{{ $_ := set $out "architecture" . }}{{ end -}}
{{- if $m.moduleShapes -}}
{{- if not (and $m.shape $m.shape.hiddenSize $m.shape.numLayers) -}}
{{- fail (printf "baseModels[%s]: moduleShapes needs shape.hiddenSize and shape.numLayers too" $m.name) -}}
{{- end -}}
{{- $shapes := dict -}}
{{- range $module, $pair := $m.moduleShapes }}{{ $_ := set $shapes $module (list (int (index $pair 0)) (int (index $pair 1))) }}{{ end -}}
{{- $_ := set $out "hidden_size" (int $m.shape.hiddenSize) -}}
{{- $_ := set $out "num_layers" (int $m.shape.numLayers) -}}
{{- $_ := set $out "module_shapes" $shapes -}}
{{- else if $m.shape -}}
{{- $s := $m.shape -}}
{{- $missing := list -}}
{{- range list "hiddenSize" "numLayers" "numAttentionHeads" "intermediateSize" }}{{ if not (index $s .) }}{{ $missing = append $missing . }}{{ end }}{{ end -}}
{{- if $missing -}}
{{- fail (printf "baseModels[%s].shape lacks %s (or give moduleShapes)" $m.name (join ", " $missing)) -}}
{{- end -}}
{{- $hidden := int $s.hiddenSize -}}
{{- $heads := int $s.numAttentionHeads -}}
{{- $kvHeads := int (default $heads $s.numKeyValueHeads) -}}
{{- $headDim := int (default (div $hidden $heads) $s.headDim) -}}
{{- $inter := int $s.intermediateSize -}}
{{- $q := mul $heads $headDim -}}
{{- $kv := mul $kvHeads $headDim -}}
{{- $_ := set $out "hidden_size" $hidden -}}
{{- $_ := set $out "num_layers" (int $s.numLayers) -}}
{{- $_ := set $out "module_shapes" (dict "q_proj" (list $hidden $q) "k_proj" (list $hidden $kv) "v_proj" (list $hidden $kv) "o_proj" (list $q $hidden) "gate_proj" (list $hidden $inter) "up_proj" (list $hidden $inter) "down_proj" (list $inter $hidden)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* (list $ backend): the backend as the admin API's BackendCreate (JSON), its key by env name. */}}
{{- define "lgw.backendCreate" -}}
{{- $root := index . 0 -}}
{{- $b := index . 1 -}}
{{- $out := dict "name" $b.name "url" (include "lgw.vllmUrl" .) "base_model" $b.baseModel "gpu_slots" (int $b.maxLoras) "max_lora_rank" (int $b.maxLoraRank) "capacity" (int (default $b.maxLoras $b.maxCpuLoras)) "kind" "shared" "api_key_env" "VLLM_API_KEY" -}}
{{- if not (kindIs "invalid" $b.maxNumSeqs) }}{{ $_ := set $out "max_num_seqs" (int $b.maxNumSeqs) }}{{ end -}}
{{- toJson $out -}}
{{- end -}}

{{/* NetworkPolicy peers */}}
{{- define "lgw.fromGatewayAndWorker" -}}
- podSelector:
    matchLabels:
      {{- include "lgw.selectorLabels" (list . "gateway") | nindent 6 }}
- podSelector:
    matchLabels:
      {{- include "lgw.selectorLabels" (list . "worker") | nindent 6 }}
{{- end -}}
{{- define "lgw.fromPrometheus" -}}
{{- $peer := dict -}}
{{- with .namespaceSelector }}{{ $_ := set $peer "namespaceSelector" . }}{{ end -}}
{{- with .podSelector }}{{ $_ := set $peer "podSelector" . }}{{ end -}}
{{- toYaml (list $peer) -}}
{{- end -}}
