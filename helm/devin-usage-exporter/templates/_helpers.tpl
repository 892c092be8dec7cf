{{/*
The chart name, or nameOverride.
*/}}
{{- define "devin-usage-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every resource: fullnameOverride, else <release>-<name> (or <release> alone when it
already contains the name). Truncated to 63 characters, the DNS label limit.
*/}}
{{- define "devin-usage-exporter.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "devin-usage-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name and instance only. A selector is immutable, so nothing that changes on an
upgrade (version, chart) may be in it.
*/}}
{{- define "devin-usage-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "devin-usage-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "devin-usage-exporter.labels" -}}
helm.sh/chart: {{ include "devin-usage-exporter.chart" . }}
{{ include "devin-usage-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ include "devin-usage-exporter.imageTag" . | quote }}
app.kubernetes.io/component: exporter
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The image tag: image.tag, else the chart's appVersion.
*/}}
{{- define "devin-usage-exporter.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The ServiceAccount the pod runs as.
*/}}
{{- define "devin-usage-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "devin-usage-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the API key: the one the chart creates from apiKey, or existingSecret.name.
Fails the render when neither or both are set.
*/}}
{{- define "devin-usage-exporter.secretName" -}}
{{- if and .Values.apiKey .Values.existingSecret.name }}
{{- fail "devin-usage-exporter: set either apiKey or existingSecret.name, not both" }}
{{- else if .Values.apiKey }}
{{- include "devin-usage-exporter.fullname" . }}
{{- else if .Values.existingSecret.name }}
{{- .Values.existingSecret.name }}
{{- else }}
{{- fail "devin-usage-exporter: the Devin API key is not set. Set apiKey (the chart creates a Secret) or existingSecret.name (a Secret in the release namespace holding the key under existingSecret.key, default \"api-key\")" }}
{{- end }}
{{- end }}

{{/*
The container port: the port of config.server.listen.
*/}}
{{- define "devin-usage-exporter.containerPort" -}}
{{- $listen := dig "server" "listen" "0.0.0.0:9877" (.Values.config | default dict) | toString }}
{{- $port := regexFind "[0-9]+$" $listen }}
{{- if not $port }}
{{- fail (printf "devin-usage-exporter: config.server.listen %q is not HOST:PORT" $listen) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
Where the ConfigMap is mounted, and the config file the exporter reads.
*/}}
{{- define "devin-usage-exporter.configDir" -}}
/etc/devin-usage-exporter
{{- end }}

{{/*
The exporter config file: .Values.config with api.api_key pointing at the DEVIN_API_KEY variable,
which the exporter expands at start-up; the key itself never enters the ConfigMap.
*/}}
{{- define "devin-usage-exporter.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $api := deepCopy (get $config "api" | default dict) }}
{{- $_ := set $api "api_key" "${DEVIN_API_KEY}" }}
{{- $_ := set $config "api" $api }}
{{- if .Values.webConfig.secretName }}
{{- $server := deepCopy (get $config "server" | default dict) }}
{{- $_ := set $server "web_config_file" (include "devin-usage-exporter.webConfigFile" .) }}
{{- $_ := set $config "server" $server }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Where the webConfig.secretName Secret is mounted, and the web config file the chart points
server.web_config_file at. Relative paths inside that file (cert_file: tls.crt) resolve from this folder.
*/}}
{{- define "devin-usage-exporter.webDir" -}}
{{ include "devin-usage-exporter.configDir" . }}/web
{{- end }}

{{- define "devin-usage-exporter.webConfigFile" -}}
{{ include "devin-usage-exporter.webDir" . }}/web-config.yaml
{{- end }}

{{/*
The number of shards, as an integer (values from YAML files arrive as floats).
*/}}
{{- define "devin-usage-exporter.shards" -}}
{{- int (.Values.shards | default 1) }}
{{- end }}

{{/*
The headless Service a sharded StatefulSet names as its serviceName. Its own label keeps it out of
the ServiceMonitor's selector, so no pod is scraped twice.
*/}}
{{- define "devin-usage-exporter.headlessServiceName" -}}
{{- printf "%s-headless" (include "devin-usage-exporter.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "devin-usage-exporter.headlessLabelKey" -}}
devin-usage-exporter/headless
{{- end }}

{{/*
The replica that polls the org set .name among .count shards: exporter/shard.py's rendezvous hash,
the index whose SHA-256 of "<index>\x00<name>" starts highest (the first 16 hex digits compare as the
64-bit integer the exporter uses). For the install notes only; the exporter decides for itself.
*/}}
{{- define "devin-usage-exporter.shardOwner" -}}
{{- $best := -1 }}
{{- $bestScore := "" }}
{{- range $index := until (int .count) }}
{{- $score := printf "%d\x00%s" $index $.name | sha256sum | trunc 16 }}
{{- if or (lt $best 0) (gt $score $bestScore) }}
{{- $best = $index }}
{{- $bestScore = $score }}
{{- end }}
{{- end }}
{{- $best }}
{{- end }}

{{/*
Checks across values that the schema cannot express; each failure says what to change.
*/}}
{{- define "devin-usage-exporter.validate" -}}
{{- $config := .Values.config | default dict }}
{{- $ownWebConfig := dig "server" "web_config_file" "" $config }}
{{- if and .Values.webConfig.secretName $ownWebConfig }}
{{- fail (printf "devin-usage-exporter: set either webConfig.secretName (the chart mounts the Secret and sets server.web_config_file to %s) or config.server.web_config_file (a file you mount with extraVolumes/extraVolumeMounts), not both" (include "devin-usage-exporter.webConfigFile" .)) }}
{{- end }}
{{- if and (or .Values.webConfig.tls .Values.webConfig.basicAuth) (not (or .Values.webConfig.secretName $ownWebConfig)) }}
{{- fail "devin-usage-exporter: webConfig.tls / webConfig.basicAuth describe the web config file, but there is none: set webConfig.secretName (or config.server.web_config_file)" }}
{{- end }}
{{- $shards := include "devin-usage-exporter.shards" . | int }}
{{- if gt $shards 1 }}
{{- if dig "shard" "" $config }}
{{- fail (printf "devin-usage-exporter: config.shard is %q, but shards is %d: the chart gives every StatefulSet pod --shard=auto/%d, which overrides config.shard; remove config.shard" (toString (dig "shard" "" $config)) $shards $shards) }}
{{- end }}
{{- $name := include "devin-usage-exporter.fullname" . }}
{{- if gt (len $name) 52 }}
{{- fail (printf "devin-usage-exporter: with shards > 1 the chart makes a StatefulSet, whose name may be at most 52 characters (Kubernetes adds a controller-revision-hash label of <name>-<hash>); %q has %d: set fullnameOverride or a shorter release name" $name (len $name)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A probe from values (.probe) adjusted to the web config (.root.Values.webConfig): HTTPS when the
endpoint serves TLS (unless the probe names its own scheme; the kubelet does not verify the
certificate), and, for the readiness probe (.readiness) with basic auth, /healthz instead of /readyz:
/readyz asks for credentials and a probe could only send them as a plain header in the pod spec.
*/}}
{{- define "devin-usage-exporter.probe" -}}
{{- $probe := deepCopy .probe }}
{{- $web := .root.Values.webConfig }}
{{- $readiness := .readiness }}
{{- with $probe.httpGet }}
{{- if and $web.tls (not .scheme) }}
{{- $_ := set . "scheme" "HTTPS" }}
{{- end }}
{{- if and $readiness $web.basicAuth (eq (toString (.path | default "")) "/readyz") }}
{{- $_ := set . "path" "/healthz" }}
{{- end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}
