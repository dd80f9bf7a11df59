{{/* The components, in one place: every template ranges over this list. */}}
{{- define "tailor.components" -}}
gateway quantizer trainer benchmarker exporter selector triton
{{- end -}}

{{/* Every component with the values block: the gRPC components above plus the web front (web.yaml), which
has its own Deployment, Service and NetworkPolicy; autoscalers, disruption budgets and checks range over this. */}}
{{- define "tailor.workloads" -}}
{{ include "tailor.components" . }} web
{{- end -}}

{{/* The components that run Tailor's own images (gRPC health, TAILOR_* settings). */}}
{{- define "tailor.services" -}}
gateway quantizer trainer benchmarker exporter selector
{{- end -}}

{{/* The stage services the gateway dispatches to (its static worker pools). */}}
{{- define "tailor.workerPools" -}}
quantizer trainer benchmarker exporter selector
{{- end -}}

{{- define "tailor.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: tailor.componentName (dict "root" $ "name" "quantizer") */}}
{{- define "tailor.componentName" -}}
{{- printf "%s-%s" (include "tailor.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tailor.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "tailor.labels" -}}
{{ include "tailor.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "tailor.image" -}}
{{- $c := index .root.Values .name -}}
{{- printf "%s%s:%s" .root.Values.global.imageRegistry $c.image.repository ($c.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* The gateway's ServiceAccount (it lists EndpointSlices when discovery.mode is kubernetes). */}}
{{- define "tailor.gatewayServiceAccount" -}}
{{- include "tailor.componentName" (dict "root" . "name" "gateway") -}}
{{- end -}}

{{/* Label selector of this release's Services; their EndpointSlices carry the same labels. */}}
{{- define "tailor.discoverySelector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" .Chart.Name .Release.Name -}}
{{- end -}}

{{/* The label that tells a component's pools apart (Deployment selectors); Services select every pool. */}}
{{- define "tailor.poolLabel" -}}tailor.dev/pool{{- end -}}

{{/*
The pools of one component as YAML {pools: [...]}: each pool is the component's settings with the pool's
own replacing them (env merged), plus name and fullName. No `pools`: one pool named "default" whose
Deployment has the component's name. Use: (include "tailor.pools" $ctx | fromYaml).pools
*/}}
{{- define "tailor.pools" -}}
{{- $c := index .root.Values .name -}}
{{- $base := dict "replicaCount" $c.replicaCount "resources" $c.resources "gpu" $c.gpu "nodeSelector" $c.nodeSelector "tolerations" $c.tolerations "affinity" $c.affinity "env" $c.env "autoscaling" $c.autoscaling -}}
{{- $pools := list -}}
{{- if $c.pools -}}
{{- range $p := $c.pools -}}
{{- $m := deepCopy $base -}}
{{- range $k, $v := $p -}}
{{- if ne $k "env" -}}{{- $_ := set $m $k $v -}}{{- end -}}
{{- end -}}
{{- $_ := set $m "env" (merge (deepCopy ($p.env | default dict)) (deepCopy ($c.env | default dict))) -}}
{{- $_ := set $m "fullName" (printf "%s-%s" (include "tailor.componentName" $) $p.name | trunc 63 | trimSuffix "-") -}}
{{- $pools = append $pools $m -}}
{{- end -}}
{{- else -}}
{{- $m := deepCopy $base -}}
{{- $_ := set $m "name" "default" -}}
{{- $_ := set $m "fullName" (include "tailor.componentName" .) -}}
{{- $pools = append $pools $m -}}
{{- end -}}
{{- toYaml (dict "pools" $pools) -}}
{{- end -}}

{{/* Resources of one pool (dict "root" $ "pool" $p), with the GPU added to requests and limits when gpu.count > 0. */}}
{{- define "tailor.resources" -}}
{{- $c := .pool -}}
{{- $resources := deepCopy ($c.resources | default dict) -}}
{{- if gt (int $c.gpu.count) 0 -}}
{{- $gpu := .root.Values.gpuNodes.resourceName -}}
{{- $_ := set $resources "requests" (merge (dict $gpu (int $c.gpu.count)) ($resources.requests | default dict)) -}}
{{- $_ := set $resources "limits" (merge (dict $gpu (int $c.gpu.count)) ($resources.limits | default dict)) -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Tolerations of one pool (dict "root" $ "pool" $p): its own, plus the GPU nodes' when it asks for GPUs. */}}
{{- define "tailor.tolerations" -}}
{{- $c := .pool -}}
{{- $tolerations := $c.tolerations | default list -}}
{{- if gt (int $c.gpu.count) 0 -}}
{{- range .root.Values.gpuNodes.tolerations -}}
{{- if not (has . $tolerations) -}}
{{- $tolerations = append $tolerations . -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $tolerations -}}
{{- toYaml $tolerations -}}
{{- end -}}
{{- end -}}

{{/* The S3 endpoint every pod uses: the bundled MinIO's Service, or store.external.endpoint. */}}
{{- define "tailor.s3Endpoint" -}}
{{- if .Values.store.minio.enabled -}}
{{- printf "http://%s:9000" (include "tailor.componentName" (dict "root" . "name" "minio")) -}}
{{- else -}}
{{- .Values.store.external.endpoint -}}
{{- end -}}
{{- end -}}

{{/* The Secret with keys access-key and secret-key. */}}
{{- define "tailor.s3Secret" -}}
{{- if .Values.store.minio.enabled -}}
{{- .Values.store.minio.existingSecret | default (include "tailor.componentName" (dict "root" . "name" "minio")) -}}
{{- else -}}
{{- .Values.store.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "tailor.s3Region" -}}
{{- if .Values.store.minio.enabled -}}us-east-1{{- else -}}{{- .Values.store.external.region | default "us-east-1" -}}{{- end -}}
{{- end -}}

{{/* Triton's --model-repository: s3://[https://]host:port/bucket/prefix/path (Triton needs the port; no endpoint: AWS S3). */}}
{{- define "tailor.tritonRepository" -}}
{{- $endpoint := include "tailor.s3Endpoint" . -}}
{{- $where := trimSuffix "/" (trimPrefix "s3://" .Values.store.url) -}}
{{- $host := "" -}}
{{- if $endpoint -}}
{{- $u := urlParse $endpoint -}}
{{- $https := eq $u.scheme "https" -}}
{{- $hostport := $u.host -}}
{{- if not (regexMatch ":[0-9]+$" $hostport) -}}{{- $hostport = printf "%s:%s" $hostport (ternary "443" "80" $https) -}}{{- end -}}
{{- $host = printf "%s%s/" (ternary "https://" "" $https) $hostport -}}
{{- end -}}
{{- printf "s3://%s%s/%s" $host $where .Values.tritonServer.modelRepositoryPath -}}
{{- end -}}

{{- define "tailor.postgresqlSecret" -}}
{{- .Values.gatewayState.postgresql.existingSecret | default (include "tailor.componentName" (dict "root" . "name" "postgresql")) -}}
{{- end -}}

{{/* A generated credential, kept across upgrades: (dict "root" $ "secret" NAME "key" KEY "length" N) */}}
{{- define "tailor.generatedSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing (hasKey ($existing.data | default dict) .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* DNS names in one component's certificate (dict "root" $ "name" N), as a YAML list. Workers add the
name every worker shares, which the gateway verifies (it dials discovered workers by pod IP). */}}
{{- define "tailor.certNames" -}}
{{- $svc := include "tailor.componentName" . -}}
{{- $ns := .root.Release.Namespace -}}
- {{ $svc }}
- {{ printf "%s.%s" $svc $ns }}
- {{ printf "%s.%s.svc" $svc $ns }}
- {{ printf "%s.%s.svc.cluster.local" $svc $ns }}
{{- if ne .name "gateway" }}
- {{ include "tailor.workerServerName" .root }}
{{- end }}
{{- end -}}

{{- define "tailor.workerServerName" -}}{{ include "tailor.fullname" . }}-workers{{- end -}}

{{/* The Secret with one component's certificate, and the items to mount from it as ca.crt, tls.crt, tls.key. */}}
{{- define "tailor.tlsVolume" -}}
{{- $tls := .root.Values.tls -}}
name: internal-tls
secret:
{{- if $tls.certManager.enabled }}
  secretName: {{ include "tailor.componentName" . }}-tls
  items:
    - {key: ca.crt, path: ca.crt}
    - {key: tls.crt, path: tls.crt}
    - {key: tls.key, path: tls.key}
{{- else }}
  secretName: {{ $tls.existingSecret | default (printf "%s-tls" (include "tailor.fullname" .root)) }}
  items:  # only its own key: a worker pod cannot present the gateway's certificate
    - {key: ca.crt, path: ca.crt}
    - {key: {{ .name }}.crt, path: tls.crt}
    - {key: {{ .name }}.key, path: tls.key}
{{- end }}
  defaultMode: 0440
{{- end -}}

{{/* The label only `helm test` hook pods carry; NetworkPolicies admit it to health ports, never to a stage service. */}}
{{- define "tailor.testHookLabel" -}}tailor.dev/helm-test-hook{{- end -}}
